"""The torch path of box coding (the CPU default): the math of ``_box_coder_kernels``, vectorized. The math,
layout and precision rules are in ``kernels/box_coder.py``'s docstring.

The functions build new tensors with out-of-place ops instead of filling the launchers' buffers: decomposing an op
for ``torch.export`` (a CPU package of aten ops) needs an entirely functional graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._contract import acc_dtype


def _decode_axis(d_ctr, d_size, lo, hi, w_ctr, w_size, clip):
    size = hi - lo
    ctr = lo + 0.5 * size
    dc = d_ctr / w_ctr
    ds = d_size / w_size
    e = torch.exp(torch.where(ds > clip, torch.full_like(ds, clip), ds))
    pred_ctr = dc * size + ctr
    half = 0.5 * (e * size)
    return pred_ctr - half, pred_ctr + half, size, dc, e, ds <= clip


def _decode_parts(deltas, boxes, weights, clip):
    """Per-axis decode of ``deltas [R, K*4]`` in the accumulation dtype, as ``[R, K]`` tensors."""
    R = deltas.shape[0]
    acc = acc_dtype(deltas.dtype)
    d = deltas.to(acc).reshape(R, deltas.shape[1] // 4, 4)
    b = boxes.to(deltas.dtype).to(acc)[:, None, :]
    wx, wy, ww, wh = weights
    xs = _decode_axis(d[..., 0], d[..., 2], b[..., 0], b[..., 2], wx, ww, clip)
    ys = _decode_axis(d[..., 1], d[..., 3], b[..., 1], b[..., 3], wy, wh, clip)
    return xs, ys


def _clamp(x: Tensor, hi: Tensor) -> Tensor:
    return torch.minimum(torch.clamp(x, min=0.0), hi)


def decode_torch(deltas, boxes, weights, clip, image_sizes, min_size, scores, score_thresh) -> tuple[Tensor, Tensor]:
    (x1, x2, *_), (y1, y2, *_) = _decode_parts(deltas, boxes, weights, clip)
    if image_sizes is not None:
        size = image_sizes.to(x1.dtype)
        img_h, img_w = size[:, 0:1], size[:, 1:2]
        # torch.minimum propagates NaN, like torch.clamp.
        x1, x2 = _clamp(x1, img_w), _clamp(x2, img_w)
        y1, y2 = _clamp(y1, img_h), _clamp(y2, img_h)
    out = torch.stack((x1, y1, x2, y2), dim=2).to(deltas.dtype)
    if min_size is None and scores is None:
        return out, deltas.new_empty((0,), dtype=torch.bool)
    valid = torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)
    if min_size is not None:
        # In the output dtype, comparing with a Python number: exactly remove_small_boxes.
        valid = valid & (out[..., 2] - out[..., 0] >= min_size) & (out[..., 3] - out[..., 1] >= min_size)
    if scores is not None:
        valid = valid & (scores > score_thresh)
    return out, valid


def decode_backward_torch(grad, deltas, boxes, weights, clip, image_sizes) -> tuple[Tensor, Tensor]:
    (x1, x2, w, dx, ex, ux), (y1, y2, h, dy, ey, uy) = _decode_parts(deltas, boxes, weights, clip)
    g = grad.to(x1.dtype)
    g1, h1, g2, h2 = g.unbind(2)
    if image_sizes is not None:
        size = image_sizes.to(x1.dtype)
        img_h, img_w = size[:, 0:1], size[:, 1:2]
        g1 = torch.where((x1 >= 0) & (x1 <= img_w), g1, 0.0)
        g2 = torch.where((x2 >= 0) & (x2 <= img_w), g2, 0.0)
        h1 = torch.where((y1 >= 0) & (y1 <= img_h), h1, 0.0)
        h2 = torch.where((y2 >= 0) & (y2 <= img_h), h2, 0.0)
    wx, wy, ww, wh = weights
    gdw = torch.where(ux, (g2 - g1) * (0.5 * (ex * w)) / ww, 0.0)
    gdh = torch.where(uy, (h2 - h1) * (0.5 * (ey * h)) / wh, 0.0)
    gd = torch.stack(((g1 + g2) * w / wx, (h1 + h2) * h / wy, gdw, gdh), dim=2)
    gw = g1 * (dx + 0.5 - 0.5 * ex) + g2 * (dx + 0.5 + 0.5 * ex)
    gh = h1 * (dy + 0.5 - 0.5 * ey) + h2 * (dy + 0.5 + 0.5 * ey)
    grad_boxes = torch.stack(((g1 + g2 - gw).sum(1), (h1 + h2 - gh).sum(1), gw.sum(1), gh.sum(1)), dim=1)
    return gd.reshape(deltas.shape).to(deltas.dtype), grad_boxes.to(boxes.dtype)


def encode_torch(reference_boxes, proposals, weights) -> Tensor:
    dtype = torch.promote_types(reference_boxes.dtype, proposals.dtype)
    acc = acc_dtype(dtype)
    g = reference_boxes.to(dtype).to(acc)
    p = proposals.to(dtype).to(acc)
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    wx, wy, ww, wh = weights
    tx = wx * ((g[:, 0] + 0.5 * gw) - (p[:, 0] + 0.5 * pw)) / pw
    ty = wy * ((g[:, 1] + 0.5 * gh) - (p[:, 1] + 0.5 * ph)) / ph
    return torch.stack((tx, ty, ww * torch.log(gw / pw), wh * torch.log(gh / ph)), dim=1).to(dtype)
