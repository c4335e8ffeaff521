"""The torch path of ``paste_masks_in_image`` (the CPU default): the kernel's math (``_paste_masks_kernels``),
vectorized. The paste is linear in the masks, ``out[d] = Wy[d] M[d] Wx[d]^T`` with two nonzero weights per row
of the resize matrices ``Wy``/``Wx``: the forward is two batched matmuls, and so is the backward (which serves
both backends).
"""

from __future__ import annotations

import torch

from ._contract import COORD_LIMIT, acc_dtype


def _expand_boxes(boxes: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """expand_boxes op for op in the boxes' dtype, then the int64 box ``[D, 4]`` and its finiteness ``[D]``."""
    x1, y1, x2, y2 = boxes.unbind(1)
    w_half = (x2 - x1) * 0.5 * scale
    h_half = (y2 - y1) * 0.5 * scale
    x_c = (x2 + x1) * 0.5
    y_c = (y2 + y1) * 0.5
    expanded = torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)
    expanded = expanded.to(acc_dtype(boxes.dtype))
    ok = torch.isfinite(expanded).all(dim=1)
    expanded = torch.where(ok[:, None], expanded.clamp(-COORD_LIMIT, COORD_LIMIT), 0.0)
    return expanded.to(torch.int64), ok


def _axis(
    lo: torch.Tensor, hi: torch.Tensor, ok: torch.Tensor, image_size: int, padded: int, dtype: torch.dtype
) -> torch.Tensor:
    """``_axis`` of the kernel for all masks at once, as resize matrices ``[D, image_size, padded]``: two
    weights per row inside the window, none outside."""
    pix = torch.arange(image_size, device=lo.device)
    lo, hi, ok = lo[:, None], hi[:, None], ok[:, None]
    inside = ok & (pix >= lo) & (pix <= hi)
    scale = (padded / (hi - lo + 1).clamp(min=1).to(torch.float64)).to(dtype)
    src = scale * ((pix - lo).to(dtype) + 0.5) - 0.5
    src = torch.where(inside, src.clamp(min=0), 0.0)
    i0 = src.to(torch.int64).clamp(max=padded - 1)
    i1 = torch.where(i0 < padded - 1, i0 + 1, i0)
    l1 = torch.where(inside, (src - i0.to(dtype)).clamp(0, 1), 0.0)
    l0 = torch.where(inside, 1 - l1, 0.0)
    weights = torch.zeros(*inside.shape, padded, dtype=dtype, device=lo.device)
    # Out of place: decomposing the op for torch.export needs a functional graph.
    return weights.scatter_add(2, i0[..., None], l0[..., None]).scatter_add(2, i1[..., None], l1[..., None])


def _resize_matrices(
    boxes: torch.Tensor,
    valid: torch.Tensor | None,
    mask_h: int,
    mask_w: int,
    image_height: int,
    image_width: int,
    padding: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paste as a linear map, ``out[d] = Wy[d] @ masks[d] @ Wx[d]^T``: ``Wy [D, H, M_h]``, ``Wx [D, W, M_w]``."""
    box, ok = _expand_boxes(boxes, float(mask_w + 2 * padding) / mask_w)
    if valid is not None:
        ok = ok & valid
    wy = _axis(box[:, 1], box[:, 3], ok, image_height, mask_h + 2 * padding, dtype)
    wx = _axis(box[:, 0], box[:, 2], ok, image_width, mask_w + 2 * padding, dtype)
    # The padding is zeros: drop its columns instead of padding the mask.
    return wy[:, :, padding : padding + mask_h], wx[:, :, padding : padding + mask_w]


def forward_torch(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    image_height: int,
    image_width: int,
    padding: int,
    threshold: float | None,
    valid: torch.Tensor | None,
) -> torch.Tensor:
    """The pasted masks ``[D, 1, H, W]`` (bool with ``threshold``), as ``forward_triton`` returns them."""
    dtype = acc_dtype(masks.dtype)
    wy, wx = _resize_matrices(boxes, valid, *masks.shape[2:], image_height, image_width, padding, dtype)
    # Two small batched matmuls: on a CPU ~20x faster than gathering four neighbours per pixel, and faster
    # than torchvision's loop. The zero weights add exact zeros, so a pixel is ATen's two-term sums up to
    # the order of additions (but a NaN or inf in a mask, times 0, spreads over the image rows and columns
    # that its mask's window touches).
    val = torch.bmm(torch.bmm(wy, masks[:, 0].to(dtype)), wx.transpose(1, 2))
    out = val.to(masks.dtype)[:, None]
    return out if threshold is None else out > threshold


def backward_torch(
    grad: torch.Tensor,
    boxes: torch.Tensor,
    valid: torch.Tensor | None,
    mask_shape: torch.Size,
    mask_dtype: torch.dtype,
    image_height: int,
    image_width: int,
    padding: int,
) -> torch.Tensor:
    """``grad_masks [D, 1, M_h, M_w]`` of ``grad [D, 1, H, W]``: ``grad_masks[d] = Wy[d]^T @ grad[d] @ Wx[d]``."""
    dtype = acc_dtype(mask_dtype)
    wy, wx = _resize_matrices(boxes, valid, *mask_shape[2:], image_height, image_width, padding, dtype)
    grad_masks = torch.bmm(torch.bmm(wy.transpose(1, 2), grad[:, 0].to(dtype)), wx)
    return grad_masks.to(mask_dtype)[:, None]
