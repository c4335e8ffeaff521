"""Our ops decomposed into aten ops for a CPU ``torch.export``: ``kernels.cpu_decompositions()``
traces each op's torch path on fake tensors; the exported graph then holds no ``mrcnn`` op and computes what
the eager op computes, on fresh random inputs (ties, invalid slots and classes included for NMS).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from kernels import cpu_decompositions, decode_boxes, encode_boxes, nms_fixed, paste_masks_in_image, use_backend
from kernels._backend import OPS


class _Call(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor):
        return self.fn(*args)


def decomposed(fn, *args: torch.Tensor) -> nn.Module:
    """``fn`` exported with the torch path and decomposed: a module of aten ops only."""
    with use_backend("torch"):
        ep = torch.export.export(_Call(fn), args).run_decompositions(cpu_decompositions())
    left = {str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "mrcnn" in str(n.target)}
    assert not left, left
    return ep.module()


def random_boxes(*shape: int, size: float = 60.0) -> torch.Tensor:
    xy = torch.rand(*shape, 2) * size
    return torch.cat([xy, xy + torch.rand(*shape, 2) * size / 2 + 0.5], -1)


def test_every_traceable_op_has_a_decomposition() -> None:
    table = cpu_decompositions()
    traceable = {"multiscale_roi_align", "decode_boxes", "encode_boxes", "nms_fixed", "paste_masks"}
    assert {name for name, op in OPS.items() if op.traceable} == traceable
    assert {op.name() for op in table} == {f"mrcnn::{name}" for name in traceable}


def test_decode_and_encode() -> None:
    deltas, boxes, scores = torch.randn(37, 3 * 4), random_boxes(37), torch.rand(37, 3)
    sizes = torch.tensor([[50, 70]]).expand(37, 2)
    weights = (10.0, 10.0, 5.0, 5.0)
    fn = lambda d, b, s, hw: decode_boxes(d, b, weights, image_sizes=hw, min_size=2.0, scores=s, score_thresh=0.3)
    with use_backend("torch"):
        want = fn(deltas, boxes, scores, sizes)
    got = decomposed(fn, deltas, boxes, scores, sizes)(deltas, boxes, scores, sizes)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    proposals = random_boxes(37)
    enc = lambda g, p: encode_boxes(g, p, weights)
    with use_backend("torch"):
        want = enc(boxes, proposals)
    torch.testing.assert_close(decomposed(enc, boxes, proposals)(boxes, proposals), want, rtol=0, atol=0)


@pytest.mark.parametrize("max_out", [5, 200])
def test_nms_fixed_is_the_greedy_walk(max_out: int) -> None:
    """Three images of 150 boxes (three 64-box blocks of the eager walk), scores with ties, classes and
    invalid slots: the same kept indices as the eager torch path, and as torchvision's batched_nms."""
    boxes = random_boxes(3, 150)
    scores = torch.randint(0, 40, (3, 150)).float() / 40  # ties
    valid = torch.rand(3, 150) > 0.1
    idxs = torch.randint(0, 3, (3, 150))
    fn = lambda b, s, v, i: nms_fixed(b, s, 0.4, max_out, valid=v, idxs=i)
    with use_backend("torch"):
        keep, keep_valid = fn(boxes, scores, valid, idxs)
    got_keep, got_valid = decomposed(fn, boxes, scores, valid, idxs)(boxes, scores, valid, idxs)
    assert torch.equal(got_valid, keep_valid) and torch.equal(got_keep, keep)
    for b in range(3):
        ok = valid[b].nonzero()[:, 0]
        want = ok[torchvision.ops.batched_nms(boxes[b, ok], scores[b, ok], idxs[b, ok], 0.4)][:max_out]
        assert torch.equal(keep[b, keep_valid[b]], want)


def test_paste_masks() -> None:
    masks, boxes = torch.rand(6, 1, 9, 9), random_boxes(6, size=30.0)
    valid = torch.tensor([True, True, False, True, True, True])
    fn = lambda m, b, v: paste_masks_in_image(m, b, (41, 37), threshold=0.5, valid=v)
    with use_backend("torch"):
        want = fn(masks, boxes, valid)
    assert torch.equal(decomposed(fn, masks, boxes, valid)(masks, boxes, valid), want)
