"""The torch path of non-maximum suppression: the greedy walk with the kernels' IoU arithmetic, vectorized (the
math is in ``kernels/nms.py``'s docstring).

``forward_torch`` is the eager walk, the CPU path of ``nms`` / ``batched_nms`` / ``nms_fixed``: class by class, in
blocks of sorted boxes, dropping the suppressed boxes after each block, with IoU tiles of bounded size (never the
N x N matrix). ``forward_traced`` is the same greedy NMS as a graph of static shapes, for fake tensors
(``torch.export`` decomposing the op).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch._higher_order_ops.while_loop import while_loop

from ._contract import acc_dtype

# The eager walk resolves BLOCK sorted boxes per step (their BLOCK x BLOCK IoU tile, then a Python step for each box
# an earlier box of the block suppresses) and computes the rest in tiles of up to TILE pairs. One thread, AVX2: a
# tile costs ~45 us of torch calls plus ~2 ns per pair up to 2^17 pairs (1 MiB per float32 temporary), ~6 ns per
# pair at 2^18. BLOCK 256 and TILE 2^17 ran fastest of 128-256 x 2^15-2^17 at 1,000-50,000 boxes.
BLOCK = 256
TILE = 1 << 17
# _EARLIER[t, s]: s comes before t.
_EARLIER = np.tril(np.ones((BLOCK, BLOCK), dtype=bool), -1)

Corners = tuple[Tensor, Tensor, Tensor]


def _corners(boxes: Tensor) -> Corners:
    """``(lo [..., 2, n], hi [..., 2, n], area [..., n])`` of boxes ``[..., n, 4]``: the corners coordinate-major
    (a pairwise tile is then contiguous per coordinate), the area in the accumulation dtype."""
    acc = acc_dtype(boxes.dtype)
    lo, hi = boxes[..., :2].transpose(-1, -2), boxes[..., 2:].transpose(-1, -2)
    area = (boxes[..., 2].to(acc) - boxes[..., 0].to(acc)) * (boxes[..., 3] - boxes[..., 1]).to(acc)
    return lo, hi, area


def _iou(a: Corners, c: Corners) -> Tensor:
    """``[..., m, n]``: ``IoU(a_i, c_j)`` of the ``_corners`` of ``m`` and ``n`` boxes, with the kernels'
    arithmetic: sides ``max(min(hi) - max(lo), 0)`` in the boxes' dtype, ``inter / ((area_i + area_j) - inter)``
    in the accumulation dtype."""
    (a_lo, a_hi, a_area), (c_lo, c_hi, c_area) = a, c
    side = torch.minimum(a_hi[..., :, None], c_hi[..., None, :]) - torch.maximum(a_lo[..., :, None], c_lo[..., None, :])
    side = side.clamp(min=0).to(a_area.dtype)
    inter = side[..., 0, :, :] * side[..., 1, :, :]
    return inter / (a_area[..., :, None] + c_area[..., None, :] - inter)


def _suppression(a: Tensor, c: Tensor, threshold: float) -> Tensor:
    """``[..., m, n]`` bool: box ``a[..., i, :]`` suppresses box ``c[..., j, :]``."""
    return _iou(_corners(a), _corners(c)) > threshold


def _exceeds(iou: Tensor, threshold: float) -> np.ndarray:
    """``iou > threshold`` in numpy: torch's CPU comparisons into bool are not vectorized (1.6 ns per element
    against numpy's 0.1 ns; torch 2.14, AVX2), and the walk reads the flags in numpy. The comparison is in the
    IoU's dtype, as torch's (the threshold is a value of that dtype, see ``nms._effective_threshold``)."""
    return np.greater(iou.cpu().numpy(), threshold)


class _Table:
    """The sorted boxes' ``_corners`` in one coordinate-major tensor (the area a row of it when the dtypes agree,
    float32 and float64), so that the corners of any boxes are one ``index_select`` away, contiguous."""

    def __init__(self, boxes: Tensor) -> None:
        lo, hi, area = _corners(boxes)
        same = area.dtype == lo.dtype
        self.coords = torch.cat([lo, hi, area[None]] if same else [lo, hi])
        self.area = None if same else area

    def __getitem__(self, positions: np.ndarray) -> Corners:
        """The corners of the boxes at ``positions`` (any shape ``S``): ``lo``, ``hi`` ``[*S[:-1], 2, S[-1]]``,
        ``area`` ``[*S]``."""
        index = torch.from_numpy(positions.reshape(-1)).to(self.coords.device)
        coords = self.coords.index_select(1, index).view(-1, *positions.shape)
        area = coords[4] if self.area is None else self.area.index_select(0, index).view(positions.shape)
        return coords[0:2].movedim(0, -2), coords[2:4].movedim(0, -2), area


def _take(corners: Corners, index: Tensor) -> Corners:
    """The corners of the boxes ``index`` selects from 1-D ``corners``."""
    lo, hi, area = corners
    return lo[:, index], hi[:, index], area[index]


def _bits(flags: np.ndarray) -> int:
    """The bool flags as an integer, bit ``t`` = ``flags[t]``."""
    return int.from_bytes(np.packbits(flags, bitorder="little").tobytes(), "little")


def _flags(bits: int, n: int) -> np.ndarray:
    """``n`` bool flags, flag ``t`` = bit ``t`` of ``bits``."""
    raw = np.frombuffer(bits.to_bytes((n + 7) // 8, "little"), dtype=np.uint8)
    return np.unpackbits(raw, count=n, bitorder="little").view(bool)


def _walk(sup: np.ndarray, counts: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Greedy NMS of ``G`` groups of up to ``S`` boxes by decreasing score, from their flags ``sup [G, S, M]``
    (``sup[g, i, j]``: box ``i`` of group ``g`` suppresses box ``j``; columns below ``S`` are the group's own boxes,
    the others later boxes of the group), over the first ``counts[g]`` boxes of each group.

    Returns ``(kept [G, S], suppressed [G, M - S])`` bool. A box no earlier box of its group suppresses is kept
    (most boxes, when classes are many); only the others take a Python step each: kept unless a kept box
    suppresses it, with one integer bitmask per box of its suppressors.
    """
    G, S, M = sup.shape
    counts = np.asarray(counts)
    # The tile of a group against itself is symmetric (IoU's arithmetic is), so row t below the diagonal holds
    # t's suppressors.
    suppressors = sup[:, :, :S] & _EARLIER[:S, :S]
    real = np.arange(S) < counts[:, None]
    contested = suppressors.any(2) & real
    kept = real & ~contested
    if contested.any():
        width = (S + 7) // 8
        rows = np.packbits(suppressors, axis=-1, bitorder="little").tobytes()
        for g in np.flatnonzero(contested.any(1)).tolist():
            bits = _bits(kept[g])
            for t in np.flatnonzero(contested[g]).tolist():
                at = (g * S + t) * width
                if not int.from_bytes(rows[at : at + width], "little") & bits:
                    bits |= 1 << t
            kept[g] = _flags(bits, S)
    return kept, (sup[:, :, S:] & kept[:, :, None]).any(1)


def _walk_class(table: _Table, live: np.ndarray, threshold: float, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy NMS of one class's boxes ``live`` (positions in ``table``, by decreasing score) down to its last
    ``BLOCK``: ``(kept positions, the live boxes left)``, nothing left once ``stop`` boxes are kept. Each step
    resolves the first ``BLOCK`` live boxes from one tile of them against the live boxes from there on (up to
    ``TILE`` pairs), then lets the block's kept boxes suppress the rest, in tiles of ``TILE`` pairs; ``live``
    drops the suppressed boxes after each step, so they cost nothing more."""
    kept: list[np.ndarray] = []
    num_kept = 0
    while len(live) > BLOCK:
        block, far = live[:BLOCK], live[BLOCK:]
        corners = table[block]
        new = np.flatnonzero(_walk(_exceeds(_iou(corners, corners), threshold)[None], [BLOCK])[0][0])
        kept.append(block[new])
        num_kept += len(new)
        if num_kept >= stop:
            return np.concatenate(kept), live[:0]
        rows = _take(corners, torch.from_numpy(new).to(table.coords.device))
        parts = np.split(far, range(TILE // len(new), len(far), TILE // len(new)))
        live = np.concatenate([p[~_exceeds(_iou(rows, table[p]), threshold).any(0)] for p in parts])
    return (np.concatenate(kept) if kept else live[:0]), live


def _walk_small(table: _Table, groups: list[np.ndarray], threshold: float) -> np.ndarray:
    """Greedy NMS of classes of at most ``BLOCK`` live boxes each (``groups``: positions in ``table``, by
    decreasing score), many per tile: largest first, each padded to the tile's first (its largest), one
    ``[G, S, S]`` tile of up to ``TILE`` pairs. The kept positions."""
    groups = sorted(groups, key=len, reverse=True)
    counts = np.array([len(g) for g in groups])
    first = np.cumsum(counts) - counts
    flat = np.concatenate(groups)
    kept = []
    i = 0
    while i < len(groups):
        S = int(counts[i])
        j = i + max(1, TILE // (S * S))
        grid = flat[first[i:j, None] + np.minimum(np.arange(S), counts[i:j, None] - 1)]
        corners = table[grid]
        new, _ = _walk(_exceeds(_iou(corners, corners), threshold), counts[i:j])
        kept.append(grid[new])
        i = j
    return np.concatenate(kept)


def _greedy_row(
    boxes: Tensor, order: Tensor, idxs: Tensor | None, valid: Tensor | None, threshold: float, stop: int
) -> np.ndarray:
    """Greedy NMS of one row: the kept positions in ``order``, increasing (so by decreasing score), at least the
    first ``stop`` of them.

    The boxes are walked class by class (a stable sort of the sorted classes keeps the score order within a
    class), so that a box is compared only with the boxes of its class, as in torchvision's per-class path:
    ``_walk_class`` takes each class down to its last ``BLOCK`` undecided boxes, ``_walk_small`` resolves those
    of all classes, many classes per tile. The N x N matrix is never built: memory stays O(N + TILE).
    """
    N = order.shape[0]
    sorted_boxes = boxes.index_select(0, order)
    alive = valid.index_select(0, order) if valid is not None else None
    perm = None
    bounds = [0, N]
    if idxs is not None:
        cls, perm = torch.sort(idxs.index_select(0, order), stable=True)
        sorted_boxes = sorted_boxes.index_select(0, perm)
        alive = alive.index_select(0, perm) if alive is not None else None
        bounds = [0, *(np.flatnonzero(np.diff(cls.cpu().numpy())) + 1).tolist(), N]
    live = np.arange(N) if alive is None else np.flatnonzero(alive.cpu().numpy())
    edges = np.searchsorted(live, bounds).tolist()  # the classes' ranges in live
    table = _Table(sorted_boxes)
    kept, small = [], []
    for start, end in zip(edges[:-1], edges[1:], strict=True):
        done, left = _walk_class(table, live[start:end], threshold, stop)
        kept.append(done)
        if len(left):
            small.append(left)
    if small:
        kept.append(_walk_small(table, small, threshold))
    positions = np.concatenate(kept)
    return np.sort(perm.cpu().numpy()[positions] if perm is not None else positions)


def forward_torch(
    boxes: Tensor,
    order: Tensor,
    idxs: Tensor | None,
    valid: Tensor | None,
    threshold: float,
    max_out: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy NMS of the rows sorted by ``order [B, N]``, per row the walk of ``_greedy_row``: ``(keep [B, max_out]
    int64, the first max_out kept indices by decreasing score, zeros after them; keep_valid [B, max_out] bool, the
    slots below the count; count [B] int64)``."""
    B, N = order.shape
    keep = torch.zeros((B, max_out), dtype=torch.int64, device=boxes.device)
    count = torch.zeros((B,), dtype=torch.int64, device=boxes.device)
    for b in range(B):
        row_idxs, row_valid = (None if idxs is None else idxs[b]), (None if valid is None else valid[b])
        kept = _greedy_row(boxes[b], order[b], row_idxs, row_valid, threshold, max_out if idxs is None else N)
        kept = torch.from_numpy(kept[:max_out]).to(boxes.device)
        keep[b, : len(kept)] = order[b].index_select(0, kept)
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
