"""Triton kernels of the fused Mask R-CNN mask loss, forward and backward, and their launchers.

Forward, one program per (RoI ``r``, block of ``BLOCK_H`` target rows): read RoI ``r``'s indices,
weight and box; sample its target rows straight from the ``uint8`` GT mask ``gt_masks[b, g]`` with
RoIAlign's bilinear sampling rule (``_sampling_kernels``; torchvision's avg mode at ``spatial_scale = 1``),
so no float copy of the masks and no ``[R, M, M]`` target tensor ever exists; read only channel
``labels[r]`` of the logits; then write

* ``loss_rows[r, i] = w_r / M^2 * sum_j bce(x_ij, t_ij)``           (partial sums, ``[R, M]``)
* ``dlogits[r, i, j] = w_r / M^2 * (sigmoid(x_ij) - t_ij)``           (``[R, M, M]``)
* ``weight_rows[r] = w_r`` (0 for an inactive RoI)                    (``[R]``)

in the accumulation dtype. The caller sums the partial buffers in torch (a fixed-shape sum: the
loss is bitwise deterministic, no float atomics) and divides by ``max(sum(weight_rows), eps)``.

Backward, one program per (RoI, block of ``BLOCK`` gradient elements): writes the WHOLE ``[R, K, M, M]``
gradient, ``dlogits * grad_loss / max(weight_sum, eps)`` on the label channel and zeros on every
other channel. The gradient is ``K`` times larger than anything else the loss touches (80 classes:
64 MB in float32 at 256 RoIs of 28 x 28), so its bytes set the cost: one kernel writing each byte
once beats ``torch.zeros`` (a full memset) followed by a scatter of the label channel (a second
launch and ``1/K`` more bytes written).

Layout: a forward program covers ``BLOCK_H x BLOCK_W`` target pixels (``BLOCK_W = next_pow2(M)``);
the per-sample geometry is computed per row (y) and per column (x) and broadcast, because the
bilinear weights are separable. Logits, boxes, masks and index vectors are read through their
strides (no copies); the outputs are ours and contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._sampling_kernels import axis, is_finite, roi_geometry, sample_coord
from ._triton_utils import autotune_configs, cast_rn, loop_bound, offset64, tl_acc_dtype, wrap_triton

# Sizes that change from batch to batch (mask count and size, and the mask strides that follow from
# them) are not specialised, so that a new padded image size does not compile a new kernel.
_VARYING_FWD = ["B", "G", "H", "W", "mask_stride_b", "mask_stride_g", "mask_stride_h"]


def _fwd_configs() -> list[triton.Config]:
    # The first is the interpreter's: whole 8x8 tiles, one program per RoI for the tests' small M.
    return [
        triton.Config({"BLOCK_H": 8}, num_warps=4),
        triton.Config({"BLOCK_H": 4}, num_warps=4),
        triton.Config({"BLOCK_H": 16}, num_warps=4),
        triton.Config({"BLOCK_H": 16}, num_warps=8),
        triton.Config({"BLOCK_H": 32}, num_warps=8),
    ]


def _bwd_configs() -> list[triton.Config]:
    # A pure streaming write; the first (interpreter) config covers a tests' RoI in one program.
    return [
        triton.Config({"BLOCK": 1024}, num_warps=4),
        triton.Config({"BLOCK": 2048}, num_warps=4),
        triton.Config({"BLOCK": 4096}, num_warps=8),
        triton.Config({"BLOCK": 8192}, num_warps=8),
    ]


@triton.autotune(configs=autotune_configs(_fwd_configs()), key=["M", "SAMPLING_RATIO", "BINARIZE"])
@triton.jit(do_not_specialize=_VARYING_FWD)
def _mask_loss_fwd_kernel(
    # pointers
    loss_rows_ptr, weight_rows_ptr, dlogits_ptr,
    logits_ptr, boxes_ptr, masks_ptr, sizes_ptr, image_idx_ptr, matched_idx_ptr, labels_ptr, weights_ptr,
    # sizes
    K, B, G, H, W,
    # strides
    logit_stride_r, logit_stride_k, logit_stride_h, logit_stride_w,
    box_stride_r, box_stride_col,
    mask_stride_b, mask_stride_g, mask_stride_h, mask_stride_w,
    size_stride_b, size_stride_col,
    image_idx_stride, matched_idx_stride, label_stride, weight_stride,
    # meta
    M: tl.constexpr, SAMPLING_RATIO: tl.constexpr, ALIGNED: tl.constexpr, BINARIZE: tl.constexpr,
    HAS_SIZES: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Fused mask targets + BCE forward; grid ``(R, cdiv(M, BLOCK_H))``.

    loss_rows_ptr:   [R, M] contiguous, ACC: ``w_r / M^2 *`` row sums of the BCE.
    weight_rows_ptr: [R] ACC: ``w_r``, or 0 for an inactive RoI (written by row block 0).
    dlogits_ptr:     [R, M, M] contiguous, ACC: ``w_r / M^2 * (sigmoid(x) - t)``, 0 when inactive.
    logits_ptr:      [R, K, M, M] float, any strides; only channel ``labels[r]`` is read.
    boxes_ptr:       [R, 4] float (x1, y1, x2, y2) in mask pixels.
    masks_ptr:       [B, G, H, W] uint8 (bool viewed as uint8) or float.
    sizes_ptr:       [B, 2] int (HAS_SIZES): valid (height, width) of image b's masks, clamped to (H, W).
    image_idx_ptr, matched_idx_ptr, labels_ptr: [R] int. weights_ptr: [R] float.

    RoI ``r`` is active when ``0 <= image_idx < B``, ``0 <= matched_idx < G``, ``0 <= label < K`` and
    ``weight != 0``; an inactive RoI reads nothing beyond its four index/weight scalars and writes
    zeros. Every address is built from indices clamped into range.
    """
    r = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1)

    b = tl.load(image_idx_ptr + r * image_idx_stride)
    g = tl.load(matched_idx_ptr + r * matched_idx_stride)
    label = tl.load(labels_ptr + r * label_stride)
    w = tl.load(weights_ptr + r * weight_stride).to(ACC)
    active = (b >= 0) & (b < B) & (g >= 0) & (g < G) & (label >= 0) & (label < K) & (w != 0)
    b = tl.where(active, b, 0)
    g = tl.where(active, g, 0)
    label = tl.where(active, label, 0)

    box = boxes_ptr + r * box_stride_r
    x1 = tl.load(box, mask=active, other=0.0).to(ACC)
    y1 = tl.load(box + box_stride_col, mask=active, other=0.0).to(ACC)
    x2 = tl.load(box + offset64(2, box_stride_col), mask=active, other=0.0).to(ACC)
    y2 = tl.load(box + offset64(3, box_stride_col), mask=active, other=0.0).to(ACC)
    # A non-finite box samples nothing (target 0, as kernels.roi_align gives 0 for it). Zeroing its
    # coordinates keeps NaN out of every later conversion.
    ok = active & is_finite(x1) & is_finite(y1) & is_finite(x2) & is_finite(y2)
    x1 = tl.where(ok, x1, 0.0)
    y1 = tl.where(ok, y1, 0.0)
    x2 = tl.where(ok, x2, 0.0)
    y2 = tl.where(ok, y2, 0.0)
    if HAS_SIZES:
        size_row = sizes_ptr + offset64(b, size_stride_b)
        h_img = tl.minimum(tl.maximum(tl.load(size_row, mask=ok, other=0), 0), H).to(tl.int32)
        w_img = tl.minimum(tl.maximum(tl.load(size_row + size_stride_col, mask=ok, other=0), 0), W).to(tl.int32)
    else:
        h_img = H
        w_img = W

    # RoIAlign's geometry at spatial_scale 1 (as the pair 1 + 0).
    start_x, start_y, bin_w, bin_h, grid_w, grid_h = roi_geometry(
        x1, y1, x2, y2, ok, 1.0, 0.0, SAMPLING_RATIO, M, M, ALIGNED, ACC
    )

    ph = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    pw = tl.arange(0, BLOCK_W)
    pix = (ph < M)[:, None] & (pw < M)[None, :]
    bin_y = ph.to(ACC)
    bin_x = pw.to(ACC)
    base = masks_ptr + offset64(b, mask_stride_b) + offset64(g, mask_stride_g)

    acc = tl.zeros((BLOCK_H, BLOCK_W), ACC)
    for iy in range(0, loop_bound(grid_h)):
        in_y, y_lo, y_hi, hy, ly = axis(sample_coord(start_y, bin_y, bin_h, iy, grid_h), h_img)
        row_lo = base + offset64(y_lo, mask_stride_h)[:, None]
        row_hi = base + offset64(y_hi, mask_stride_h)[:, None]
        for ix in range(0, loop_bound(grid_w)):
            in_x, x_lo, x_hi, hx, lx = axis(sample_coord(start_x, bin_x, bin_w, ix, grid_w), w_img)
            # Outside samples load nothing and contribute 0 (their weights are finite: c = 0).
            m = pix & in_y[:, None] & in_x[None, :]
            col_lo = offset64(x_lo, mask_stride_w)[None, :]
            col_hi = offset64(x_hi, mask_stride_w)[None, :]
            v1 = tl.load(row_lo + col_lo, mask=m, other=0).to(ACC)
            v2 = tl.load(row_lo + col_hi, mask=m, other=0).to(ACC)
            v3 = tl.load(row_hi + col_lo, mask=m, other=0).to(ACC)
            v4 = tl.load(row_hi + col_hi, mask=m, other=0).to(ACC)
            acc += (
                (hy[:, None] * hx[None, :]) * v1
                + (hy[:, None] * lx[None, :]) * v2
                + (ly[:, None] * hx[None, :]) * v3
                + (ly[:, None] * lx[None, :]) * v4
            )
    t = acc / tl.maximum(grid_h * grid_w, 1)
    if BINARIZE:
        t = tl.where(t >= 0.5, 1.0, 0.0).to(ACC)

    live = pix & active
    # A permuted [R, K, M, M] tensor can have strides whose products with an int32 index pass 2**31.
    logit_offs = (offset64(label, logit_stride_k) + offset64(ph, logit_stride_h)[:, None]
                  + offset64(pw, logit_stride_w)[None, :])  # fmt: skip
    x = tl.load(logits_ptr + r * logit_stride_r + logit_offs, mask=live, other=0.0).to(ACC)
    # Stable BCE: max(x, 0) - x*t + log1p(exp(-|x|)). log1p by Goldberg's formula
    # log(u) * e / (u - 1), u = 1 + e, exact to a few ulp (libdevice's log1p is unavailable under the
    # interpreter); u == 1 means e is below half an ulp and log1p(e) = e.
    e = tl.exp(-tl.abs(x))
    u = 1.0 + e
    log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    bce = tl.maximum(x, 0.0) - x * t + log1p_e
    sigmoid = tl.where(x >= 0, 1.0 / u, e / u)
    scale = w / (M * M)

    row_sums = tl.sum(tl.where(live, bce, 0.0), axis=1) * scale
    tl.store(loss_rows_ptr + r * M + ph, row_sums, mask=ph < M)
    dl_offs = r * (M * M) + ph[:, None] * M + pw[None, :]
    tl.store(dlogits_ptr + dl_offs, tl.where(live, (sigmoid - t) * scale, 0.0), mask=pix)
    tl.store(weight_rows_ptr + r, tl.where(active, w, 0.0), mask=pid_h == 0)


@triton.autotune(configs=autotune_configs(_bwd_configs()), key=["M"])
@triton.jit(do_not_specialize=["K"])
def _mask_loss_bwd_kernel(
    # pointers
    grad_ptr, grad_loss_ptr, weight_sum_ptr, dlogits_ptr, labels_ptr,
    # sizes
    K,
    # strides
    label_stride,
    # parameters
    eps,
    # meta
    M: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Gradient w.r.t. the logits; grid ``(R, cdiv(K * M * M, BLOCK))``.

    grad_ptr:       [R, K, M, M] contiguous (we allocate it), the logits' dtype, written in full: the
                    label channel and zeros. Each program writes ``BLOCK`` consecutive elements of one RoI.
    grad_loss_ptr:  [] upstream gradient of the loss. weight_sum_ptr: [] ACC, ``sum(weight_rows)``.
    dlogits_ptr:    [R, M, M] contiguous ACC from the forward.
    labels_ptr:     [R] int; a label outside ``[0, K)`` matches no channel (all zeros).
    """
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    label = tl.load(labels_ptr + r * label_stride)
    scale = tl.load(grad_loss_ptr).to(ACC) / tl.maximum(tl.load(weight_sum_ptr), eps)
    k = offs // (M * M)  # M is constexpr: a multiply-shift, not a division
    p = offs - k * (M * M)
    inside = offs < K * (M * M)
    on_label = inside & (k == label)
    d = tl.load(dlogits_ptr + r * (M * M) + p, mask=on_label, other=0.0)
    val = tl.where(on_label, d * scale, 0.0)
    tl.store(grad_ptr + r * K * (M * M) + offs, cast_rn(val, grad_ptr.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------
# Launchers (inputs are validated by the caller, kernels.mask_loss)
# ----------------------------------------------------------------------------------------------


def forward_triton(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    gt_masks: torch.Tensor,
    mask_sizes: torch.Tensor | None,
    image_idx: torch.Tensor,
    matched_idx: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    binarize: bool,
    aligned: bool,
    sampling_ratio: int,
    acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``(loss_rows [R, M], weight_rows [R], dlogits [R, M, M])`` in ``acc``."""
    R, K, M = logits.shape[0], logits.shape[1], logits.shape[-1]
    dev = logits.device
    loss_rows = torch.empty((R, M), dtype=acc, device=dev)
    weight_rows = torch.empty((R,), dtype=acc, device=dev)
    dlogits = torch.empty((R, M, M), dtype=acc, device=dev)
    if R == 0:
        return loss_rows, weight_rows, dlogits
    masks = gt_masks.view(torch.uint8) if gt_masks.dtype == torch.bool else gt_masks
    # Without sizes the kernel never reads the pointer: pass any tensor, strides 0.
    sizes, size_strides = (mask_sizes, mask_sizes.stride()) if mask_sizes is not None else (image_idx, (0, 0))
    grid = lambda meta: (R, triton.cdiv(M, meta["BLOCK_H"]))
    wrap_triton(_mask_loss_fwd_kernel)[grid](
        loss_rows, weight_rows, dlogits,
        logits, boxes, masks, sizes, image_idx, matched_idx, labels, weights,
        K, *masks.shape,
        *logits.stride(), *boxes.stride(), *masks.stride(), *size_strides,
        image_idx.stride(0), matched_idx.stride(0), labels.stride(0), weights.stride(0),
        M=M, SAMPLING_RATIO=max(sampling_ratio, 0), ALIGNED=aligned, BINARIZE=binarize,
        HAS_SIZES=mask_sizes is not None, BLOCK_W=triton.next_power_of_2(M), ACC=tl_acc_dtype(logits.dtype),
    )  # fmt: skip
    return loss_rows, weight_rows, dlogits


def backward_triton(
    grad_loss: torch.Tensor,
    dlogits: torch.Tensor,
    weight_sum: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    dtype: torch.dtype,
    eps: float,
) -> torch.Tensor:
    """Launch the backward kernel: the full ``[R, K, M, M]`` gradient in ``dtype``."""
    R, M = dlogits.shape[0], dlogits.shape[-1]
    grad = torch.empty((R, num_classes, M, M), dtype=dtype, device=dlogits.device)
    if grad.numel() == 0:
        return grad
    grid = lambda meta: (R, triton.cdiv(num_classes * M * M, meta["BLOCK"]))
    wrap_triton(_mask_loss_bwd_kernel)[grid](
        grad, grad_loss, weight_sum, dlogits, labels, num_classes, labels.stride(0), eps,
        M=M, ACC=tl_acc_dtype(dlogits.dtype),
    )  # fmt: skip
    return grad
