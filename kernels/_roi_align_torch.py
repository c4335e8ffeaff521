"""The torch implementation of RoIAlign (single- and multi-level), forward and backward: the CPU path.

It runs on any device (``use_backend("torch")`` on CUDA tensors): every tensor it makes is on the inputs' device.

The same math as the Triton kernels (see ``_roi_align_kernels``; the sampling rule is ``_sampling_torch``),
vectorized over all RoIs of all levels at once. The levels' features form one pixel-major table
``[sum_l N*H_l*W_l, C]``; every RoI looks up its level's size and first row (a ``where`` over the few levels), and
every output bin ``(k, i, j)`` becomes one row of ``[K*PH*PW, S]`` table-row indices and bilinear weights: the 4
corners of each of the bin's ``Gh*Gw`` samples, ``S = 4*Gh*Gw``. RoIs with smaller grids, invalid RoIs and samples
outside the map weigh 0.

* average: ``embedding_bag(rows, table, per_sample_weights=weights, mode="sum")``, which never materialises the
  ``[K*PH*PW, S, C]`` corners; its transpose, the backward, is an ``embedding_bag`` over the output gradient with
  the entries sorted by table row, one bag per table row;
* max: ``embedding_bag`` over the 4 corners of every sample, then the max over a bin's samples (first maximum
  wins); the backward ``index_add``s the gradient to the 4 corners of each bin's arg-max sample.

No op depends on the data for its shape (no ``nonzero``, no ``.item()``, no sparse tensors) and no op writes in
place, so ``torch.export`` can trace this path under fake tensors into plain aten ops (an AOTInductor package with
no custom op), average and max alike. One exception: adaptive sampling (``sampling_ratio <= 0``) pads every RoI to
the call's largest grid, read from the data with ``int(grid.max())``; tracing it raises a ``ValueError`` (Mask
R-CNN's poolers use the fixed ``sampling_ratio=2``). RoIs are processed in static ranges (chunks) so that the
largest intermediate stays under ``_CHUNK_ELEMENTS`` values.

"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from ._contract import acc_dtype, level_range
from ._sampling_torch import axis, sample_coord, samples_per_bin

_CHUNK_ELEMENTS = 1 << 24


@dataclass
class _Plan:
    """Per-RoI ``[K]`` tensors: where its level's map lies in the table (index dtype) and its sample geometry
    (accumulation dtype; the grids long, 0 for an invalid RoI)."""

    height: torch.Tensor
    width: torch.Tensor
    base: torch.Tensor  # table row of pixel (0, 0) of the RoI's image in its level
    start_x: torch.Tensor
    start_y: torch.Tensor
    bin_w: torch.Tensor
    bin_h: torch.Tensor
    grid_w: torch.Tensor
    grid_h: torch.Tensor

    def __getitem__(self, rois: slice) -> _Plan:
        return _Plan(*(getattr(self, f.name)[rois] for f in fields(self)))


def _per_level(level: torch.Tensor, values: list, dtype: torch.dtype) -> torch.Tensor:
    """``values[level]`` for a small python list, as a chain of ``where``: a tensor made from the list would be a
    constant that torch 2.11's run_decompositions loses ("Constant tensor lifted_tensor_0 is not in the constants
    dictionary"); ``torch.tensor`` also records an in-place ``detach_``."""
    out = torch.full(level.shape, values[0], dtype=dtype, device=level.device)
    for lvl, value in enumerate(values[1:], 1):
        out = torch.where(level == lvl, value, out)
    return out


def _index_dtype(shapes: list[tuple[int, int]], batch_size: int, channels: int) -> torch.dtype:
    """int32 while the table's elements fit (every table row and flat index does): sorting int32 rows in the
    backward takes 5.5 ms against 14.7 ms for int64 (1.6M rows, one thread)."""
    return torch.int32 if batch_size * sum(h * w for h, w in shapes) * channels < 2**31 else torch.long


def _plan(
    rois: torch.Tensor,
    valid: torch.Tensor | None,
    shapes: list[tuple[int, int]],
    batch_size: int,
    channels: int,
    scales: list[float],
    pooled: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
    canonical: tuple[float, float],
    acc: torch.dtype,
) -> _Plan:
    # No in-place op anywhere (not even ``ok &= ...``): run_decompositions traces an op's python implementation
    # without functionalizing it and refuses a graph with in-place nodes.
    r = rois.to(acc)  # coordinates in the features' accumulation dtype, whatever the rois' dtype
    b, x1, y1, x2, y2 = r.unbind(1)
    ok = torch.isfinite(r).all(1) & (b >= 0) & (b < batch_size)
    if valid is not None:
        ok = ok & valid
    r = torch.where(ok[:, None], r, 0)
    b, x1, y1, x2, y2 = r.unbind(1)
    level = torch.zeros_like(b, dtype=torch.long)
    if len(scales) > 1:
        k_min, k_max = level_range(scales)
        area = (x2 - x1) * (y2 - y1)
        ok = ok & (area >= 0)
        s = torch.sqrt(area.clamp(min=0))
        lvl = torch.floor(canonical[1] + torch.log2(s / canonical[0]) + 1e-6)
        level = (lvl.clamp(k_min, k_max) - k_min).long()
        ok = ok & (level < len(scales))
        level = torch.where(ok, level, 0)
    scale = _per_level(level, scales, acc)
    offset = 0.5 if aligned else 0.0
    start_x, start_y = x1 * scale - offset, y1 * scale - offset
    roi_w, roi_h = x2 * scale - offset - start_x, y2 * scale - offset - start_y
    # As the kernels: coordinates that overflow once scaled sample nothing, with a geometry of zeros.
    ok = ok & torch.isfinite(torch.stack([start_x, start_y, roi_w, roi_h])).all(0)
    start_x, start_y, roi_w, roi_h = (torch.where(ok, v, 0) for v in (start_x, start_y, roi_w, roi_h))
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    bin_w, bin_h = roi_w / pooled[1], roi_h / pooled[0]
    grid_w, grid_h = samples_per_bin(bin_w, ok, sampling_ratio), samples_per_bin(bin_h, ok, sampling_ratio)
    index = _index_dtype(shapes, batch_size, channels)
    first = [batch_size * sum(h * w for h, w in shapes[:lvl]) for lvl in range(len(shapes))]
    height = _per_level(level, [h for h, _ in shapes], index)
    width = _per_level(level, [w for _, w in shapes], index)
    base = _per_level(level, first, index) + b.to(index) * height * width
    return _Plan(height, width, base, start_x, start_y, bin_w, bin_h, grid_w, grid_h)


def _grid(plan: _Plan, sampling_ratio: int) -> tuple[int, int]:
    """``(Gh, Gw)``, the sample grid every RoI is padded to: the fixed ratio, or the call's largest adaptive grid."""
    if sampling_ratio > 0:
        return sampling_ratio, sampling_ratio
    if is_fake(plan.grid_h) or torch.compiler.is_compiling():
        raise ValueError(
            "RoIAlign's torch path cannot be traced (torch.export / a compile decomposition) with adaptive "
            "sampling (sampling_ratio <= 0): its sample grid is the largest ceil(bin size) of the boxes, a "
            "data-dependent size. Pass a fixed sampling_ratio > 0 (Mask R-CNN's poolers use 2)."
        )
    return max(int(plan.grid_h.max()), 1), max(int(plan.grid_w.max()), 1)


def _bin_samples(
    start: torch.Tensor, bin_size: torch.Tensor, grid: torch.Tensor, G: int, bins: int, size: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One axis's sample corners and weights for RoIs ``[k]``: ``[bins, G, 2 (low, high), k]`` each.

    Weights are 0 for padded samples (index >= the RoI's grid) and for samples outside the map.
    """
    s = torch.arange(G, dtype=start.dtype, device=start.device)[:, None]
    i = torch.arange(bins, dtype=start.dtype, device=start.device)[:, None, None]
    _, low, high, w_low, w_high = axis(sample_coord(start, i, bin_size, s, grid.clamp(min=1)), size)
    keep = torch.arange(G, device=grid.device)[:, None] < grid
    return torch.stack([low, high], 2), torch.stack([w_low, w_high], 2) * keep[:, None]


def _corners(
    plan: _Plan, grid: tuple[int, int], pooled: tuple[int, int], average: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows (index dtype) and bilinear weights of every bin's sample corners, ``[k*PH*PW, Gh*Gw*4]``.

    A row's entries are ordered (sample y, sample x, corner y, corner x); ``average`` divides the weights by the
    RoI's sample count.
    """
    (PH, PW), (Gh, Gw) = pooled, grid
    y, wy = _bin_samples(plan.start_y, plan.bin_h, plan.grid_h, Gh, PH, plan.height)
    x, wx = _bin_samples(plan.start_x, plan.bin_w, plan.grid_w, Gw, PW, plan.width)
    y = y * plan.width + plan.base
    if average:
        wy = wy / (plan.grid_h * plan.grid_w).clamp(min=1)
    # [PH, PW, Gh, Gw, 2 (y corner), 2 (x corner), k], the RoIs innermost, then one transposing copy to the bags'
    # layout: the same broadcasts with k outermost (inner loops of 2) take 0.62 ms against 0.12 ms (7x7, K=128).
    rows = y[:, None, :, None, :, None] + x[None, :, None, :, None, :]
    weights = wy[:, None, :, None, :, None] * wx[None, :, None, :, None, :]
    # contiguous(): with a single bin and a 1-wide grid, permute + reshape is a strided view (max mode views it).
    bags = plan.base.shape[0] * PH * PW  # not len(): an int, which would specialize a dynamic batch
    rows, weights = (t.permute(6, 0, 1, 2, 3, 4, 5).contiguous().view(bags, -1) for t in (rows, weights))
    return rows, weights


def _chunks(K: int | torch.SymInt, per_roi: int) -> list[slice]:
    """Static ranges of RoIs whose intermediates of ``per_roi`` values per RoI stay under ``_CHUNK_ELEMENTS``; one
    range when ``K`` is symbolic (an export with a dynamic batch), which a loop over it would specialize."""
    if not isinstance(K, int):
        return [slice(None)]
    step = max(1, _CHUNK_ELEMENTS // max(per_roi, 1))
    return [slice(k, k + step) for k in range(0, K, step)]


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
    if not (K and C):
        out = f0.new_zeros((K, C, PH, PW))
        return out, f0.new_full(out.shape if max_mode else (0,), -1, dtype=torch.int32)
    acc = acc_dtype(f0.dtype)
    shapes = [(f.shape[2], f.shape[3]) for f in features]
    plan = _plan(rois, valid, shapes, N, C, scales, pooled, sampling_ratio, aligned, canonical, acc)
    Gh, Gw = _grid(plan, sampling_ratio)
    table = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, C) for f in features]).to(acc)
    outs, args = [], []
    for ch in _chunks(K, PH * PW * Gh * Gw * (4 + C if max_mode else 4)):
        p = plan[ch]
        rows, weights = _corners(p, (Gh, Gw), pooled, average=not max_mode)
        if not max_mode:
            outs.append(F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum"))
            continue
        # Each sample's bilinear value [k, PH*PW, Gh*Gw, C], then the max over a bin's existing samples.
        val = F.embedding_bag(rows.view(-1, 4), table, per_sample_weights=weights.view(-1, 4), mode="sum")
        exists = (torch.arange(Gh, device=f0.device) < p.grid_h[:, None])[:, :, None] & (
            torch.arange(Gw, device=f0.device) < p.grid_w[:, None]
        )[:, None, :]
        val = torch.where(exists.flatten(1)[:, None, :, None], val.view(-1, PH * PW, Gh * Gw, C), float("-inf"))
        best, flat_arg = val.max(2)  # [k, PH*PW, C]
        arg = (flat_arg // Gw) * p.grid_w[:, None, None] + flat_arg % Gw
        some = (p.grid_h * p.grid_w > 0)[:, None, None]
        outs.append(torch.where(some, best, 0))
        args.append(torch.where(some, arg, -1).to(torch.int32))
    out = torch.cat(outs).view(K, PH, PW, C).permute(0, 3, 1, 2).contiguous().to(f0.dtype)
    if not max_mode:
        return out, out.new_empty((0,), dtype=torch.int32)
    return out, torch.cat(args).view(K, PH, PW, C).permute(0, 3, 1, 2).contiguous()


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
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if not (K and C and N):
        return [grad.new_zeros((N, C, h, w)).contiguous(memory_format=fmt) for h, w in level_shapes]
    acc = acc_dtype(grad.dtype)
    plan = _plan(rois, valid, level_shapes, N, C, scales, pooled, sampling_ratio, aligned, canonical, acc)
    Gh, Gw = _grid(plan, sampling_ratio)
    table_rows = N * sum(h * w for h, w in level_shapes)
    g_all = grad.permute(0, 2, 3, 1).reshape(K * PH * PW, C).to(acc)
    table = None
    for ch in _chunks(K, PH * PW * (Gh * Gw * 4 + C * 4 if max_mode else Gh * Gw * 4)):
        rows, weights = _corners(plan[ch], (Gh, Gw), pooled, average=not max_mode)
        g = g_all[ch.start * PH * PW : ch.stop * PH * PW]
        if max_mode:
            # The 4 corners of each (bin, channel)'s arg-max sample (its index in the padded grid, gathered), added
            # into the flat table: every channel has its own sample.
            arg = argmax[ch].permute(0, 2, 3, 1).reshape(-1, C).long()
            grid_w = plan.grid_w[ch].clamp(min=1).repeat_interleave(PH * PW)[:, None]
            sample = ((arg // grid_w) * Gw + arg % grid_w).clamp(min=0)[..., None].expand(-1, -1, 4)
            rows = rows.view(-1, Gh * Gw, 4).gather(1, sample)  # [k*PH*PW, C, 4]
            weights = weights.view(-1, Gh * Gw, 4).gather(1, sample) * (arg >= 0)[..., None]
            index = (rows * C + torch.arange(C, dtype=rows.dtype, device=rows.device)[:, None]).flatten()
            part = g.new_zeros((table_rows * C,)).index_add(0, index, (g[..., None] * weights).flatten())
        else:
            # The transpose of the forward's embedding_bag is an embedding_bag over the gradient rows: the (bin,
            # corner) entries sorted by table row, one bag per table row. 15 ms against 95 ms for an index_add of
            # the materialised [k*PH*PW*S, C] products (25088 bins x 16 entries, C=64, one thread). The stable sort
            # fixes the order of every row's sum: the result is deterministic, on CUDA too.
            target, order = rows.flatten().sort(stable=True)
            every_row = torch.arange(table_rows, dtype=target.dtype, device=target.device)
            starts = torch.searchsorted(target, every_row, out_int32=target.dtype == torch.int32)
            bins = torch.div(order, rows.shape[1], rounding_mode="floor").to(rows.dtype)
            part_weights = weights.flatten()[order]
            part = F.embedding_bag(bins, g, starts, per_sample_weights=part_weights, mode="sum")
        table = part.view(table_rows, C) if table is None else table + part.view(table_rows, C)
    # copy=True: channels-last gradients in the accumulation dtype would otherwise be views of one table, and a
    # custom op's outputs may not alias each other.
    return [
        t.view(N, h, w, C).permute(0, 3, 1, 2).to(dtype=grad.dtype, memory_format=fmt, copy=True)
        for t, (h, w) in zip(table.split([N * h * w for h, w in level_shapes]), level_shapes, strict=True)
    ]
