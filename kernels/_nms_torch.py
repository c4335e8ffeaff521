"""The torch path of non-maximum suppression: the greedy walk of ``_nms_kernels`` with the kernels' IoU
arithmetic, vectorized (the math is in ``kernels/nms.py``'s docstring).

``forward_torch`` walks blocks of 64 sorted boxes eagerly, as the sweep kernel does; ``forward_traced`` is the
same greedy NMS as a graph of static shapes, for fake tensors (``torch.export`` decomposing the op).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._higher_order_ops.while_loop import while_loop

from ._contract import NMS_WORD, acc_dtype


def _suppression(a: Tensor, c: Tensor, threshold: float) -> Tensor:
    """``[..., m, n]`` bool: box ``a[..., i, :]`` suppresses box ``c[..., j, :]`` (the kernel's arithmetic,
    vectorized)."""
    acc = acc_dtype(a.dtype)
    iw = torch.minimum(a[..., :, None, 2], c[..., None, :, 2]) - torch.maximum(a[..., :, None, 0], c[..., None, :, 0])
    ih = torch.minimum(a[..., :, None, 3], c[..., None, :, 3]) - torch.maximum(a[..., :, None, 1], c[..., None, :, 1])
    inter = iw.clamp(min=0).to(acc) * ih.clamp(min=0).to(acc)
    area_a = (a[..., 2].to(acc) - a[..., 0].to(acc)) * (a[..., 3] - a[..., 1]).to(acc)
    area_c = (c[..., 2].to(acc) - c[..., 0].to(acc)) * (c[..., 3] - c[..., 1]).to(acc)
    return inter / (area_a[..., :, None] + area_c[..., None, :] - inter) > threshold


def forward_torch(
    boxes: Tensor,
    order: Tensor,
    idxs: Tensor | None,
    valid: Tensor | None,
    threshold: float,
    max_out: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy NMS of the rows sorted by ``order [B, N]``: ``(keep [B, max_out] int64, keep_valid [B, max_out] bool,
    count [B] int64)``, by the sweep kernel's block walk: per block of 64 sorted boxes, resolve the block with
    Python integer bitmasks, then let its kept boxes suppress the later boxes (one vectorized IoU per block)."""
    B, N = order.shape
    keep = torch.zeros((B, max_out), dtype=torch.int64, device=boxes.device)
    count = torch.zeros((B,), dtype=torch.int64, device=boxes.device)
    lanes = torch.arange(NMS_WORD, device=boxes.device)
    for b in range(B):
        sorted_boxes = boxes[b].index_select(0, order[b])
        cls = idxs[b].index_select(0, order[b]) if idxs is not None else None
        removed = torch.zeros(N, dtype=torch.bool, device=boxes.device)
        if valid is not None:
            removed |= ~valid[b].index_select(0, order[b])
        kept: list[int] = []
        for start in range(0, N, NMS_WORD):
            if len(kept) >= max_out:
                break
            end = min(start + NMS_WORD, N)
            blk = sorted_boxes[start:end]
            n = end - start
            sup = _suppression(blk, blk, threshold) & (lanes[None, :n] > lanes[:n, None])
            if cls is not None:
                sup &= cls[start:end, None] == cls[None, start:end]
            # Words of the diagonal block (bit 63 is the sign bit: the sum of distinct powers never overflows).
            diag = [d & (2**64 - 1) for d in (sup.long() << lanes[:n]).sum(1).tolist()]
            w = sum(1 << t for t, r in enumerate(removed[start:end].tolist()) if r)
            new = []
            for t in range(n):
                if not (w >> t) & 1:
                    new.append(t)
                    w |= diag[t]
            kept += [start + t for t in new]
            if new and end < N:
                rows = blk[new]
                later = _suppression(rows, sorted_boxes[end:], threshold)
                if cls is not None:
                    later &= cls[start:end][new][:, None] == cls[None, end:]
                removed[end:] |= later.any(0)
        kept = kept[:max_out]
        keep[b, : len(kept)] = order[b, kept]
        count[b] = len(kept)
    return keep, torch.arange(max_out, device=boxes.device)[None, :] < count[:, None], count


def forward_traced(
    boxes: Tensor, order: Tensor, idxs: Tensor | None, valid: Tensor | None, threshold: float, max_out: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy NMS as a graph of static shapes, for fake tensors (``torch.export`` decomposing the op into aten
    ops for a CPU package): the whole ``[B, N, N]`` suppression matrix of the sorted boxes, then one
    ``while_loop`` step per sorted box (``alive &= ~(alive[i] & suppresses[i])``), exactly the greedy walk.
    Eager runs take the block walk of ``forward_torch`` instead: a Python loop of N tensor steps costs
    1.6 s at N = 1000 eagerly, 29 ms once AOTInductor has compiled it (2 cores)."""
    B, N = order.shape
    sorted_boxes = torch.gather(boxes, 1, order[..., None].expand(B, N, 4))
    later = torch.ones((N, N), dtype=torch.bool, device=boxes.device).triu(1)
    sup = _suppression(sorted_boxes, sorted_boxes, threshold) & later
    if idxs is not None:
        cls = torch.gather(idxs, 1, order)
        sup = sup & (cls[:, :, None] == cls[:, None, :])
    alive = torch.gather(valid, 1, order) if valid is not None else torch.ones_like(order, dtype=torch.bool)

    def step(i: Tensor, alive: Tensor) -> tuple[Tensor, Tensor]:
        row = sup.index_select(1, i.reshape(1))[:, 0]
        return i + 1, alive & ~(row & alive.index_select(1, i.reshape(1)))

    # The bound as a tensor: a Python int captured by the condition can reach inductor's while_loop lowering as an
    # int input, which it refuses (torch 2.14: "'int' object has no attribute 'meta'").
    n = torch.full((), N, dtype=torch.int64, device=boxes.device)
    _, alive = while_loop(lambda i, _: i < n, step, (torch.zeros((), dtype=torch.int64, device=boxes.device), alive))
    # The first max_out kept boxes, by rank; the others go to a spare column that is cut off.
    rank = alive.cumsum(1) - 1
    slot = torch.where(alive & (rank < max_out), rank, max_out)
    keep = torch.zeros((B, max_out + 1), dtype=torch.int64, device=boxes.device).scatter(1, slot, order)[:, :max_out]
    count = alive.sum(1).clamp(max=max_out)
    return keep, torch.arange(max_out, device=boxes.device)[None, :] < count[:, None], count
