"""The torch path of every op allocates on its inputs' device, so that it runs on CUDA tensors too.

Checked without a GPU: inputs on the CPU, and every torch factory (``torch.zeros``, ``torch.arange``,
``torch.tensor``, ...) patched to allocate on "meta" when called without a device. An allocation that forgets
its device then meets the CPU inputs and raises, or leaves a meta tensor in the result; a torch path that gives
the very results it gives without the patch allocated everything on its inputs' device (or deliberately on the
host). ``with torch.device("meta")`` would not do: a ``TorchFunctionMode`` is off while it handles a call, so it
never reaches the implementations beneath ``torch.ops.mrcnn.*``. The ``cuda`` test then runs the torch path on
CUDA tensors against the Triton kernels.

Each case builds its inputs on a device (outside the patch) and returns the call to check, which returns every
result and gradient as a list of tensors.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

from kernels import (
    BoxCoder,
    backend_for,
    batched_nms,
    decode_boxes,
    encode_boxes,
    mask_loss,
    multiscale_roi_align,
    nms,
    nms_fixed,
    paste_masks_in_image,
    roi_align,
    use_backend,
)
from tests.calls import CountedOps, counted_calls
from tests.tolerances import tol

Case = Callable[[str], Callable[[], list[Tensor]]]


def forward_backward(fn: Callable[..., Tensor], *tensors: Tensor) -> list[Tensor]:
    """``fn(*leaves)`` and its gradients w.r.t. fresh leaf copies of ``tensors``, for the output gradient
    ``cos(out)`` (built from the output: nothing allocated by the test itself)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, out.detach().cos())]


def random_boxes(n: int, extent: float, min_size: float, max_size: float) -> Tensor:
    """``[n, 4]`` float32 boxes in an ``extent``-sized image; some stick out of it."""
    xy = torch.rand(n, 2) * extent * 1.2 - 0.1 * extent
    return torch.cat([xy, xy + min_size + torch.rand(n, 2) * (max_size - min_size)], dim=1)


def roi_align_case(pool_mode: str, sampling_ratio: int, aligned: bool) -> Case:
    def build(device: str) -> Callable[[], list[Tensor]]:
        x = torch.randn(2, 3, 8, 9, device=device)
        rois = torch.cat([torch.randint(0, 2, (5, 1)).float(), random_boxes(5, 16.0, 1.0, 12.0)], 1).to(device)
        return lambda: forward_backward(
            lambda f: roi_align(f, rois, (2, 3), 0.5, sampling_ratio, aligned, pool_mode=pool_mode), x
        )

    return build


def multiscale_case(pool_mode: str) -> Case:
    def build(device: str) -> Callable[[], list[Tensor]]:
        features = [torch.randn(2, 2, 128 >> lvl, 128 >> lvl, device=device) for lvl in range(2, 6)]
        # Sides of ~20, 112, 224 and 448 pixels: one RoI per FPN level (P2..P5), and a padded slot.
        boxes = torch.cat([random_boxes(1, 128.0, s, s * 1.1) for s in (20.0, 112.0, 224.0, 448.0, 60.0)])
        rois = torch.cat([torch.tensor([[0.0], [1.0], [0.0], [1.0], [0.0]]), boxes], 1).to(device)
        valid = torch.tensor([True, True, True, True, False], device=device)
        scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
        return lambda: forward_backward(
            lambda *f: multiscale_roi_align(list(f), rois, 3, scales, 2, valid=valid, pool_mode=pool_mode),
            *features,
        )

    return build


def mask_loss_case(device: str) -> Callable[[], list[Tensor]]:
    R, K, M, B, G, H, W = 6, 3, 5, 2, 3, 9, 11
    logits = torch.randn(R, K, M, M, device=device)
    boxes = random_boxes(R, 10.0, 0.5, 7.0).to(device)
    gt_masks = (torch.rand(B, G, H, W, device=device) > 0.5).to(torch.uint8)
    image_idx = torch.randint(0, B, (R,), device=device)
    matched_idx = torch.randint(0, G, (R,), device=device)
    labels = torch.randint(0, K, (R,), device=device)
    weights = torch.rand(R, device=device) + 0.5
    weights[0] = 0  # a padded slot
    sizes = torch.tensor([[H, W], [H - 2, W - 3]], device=device)
    return lambda: forward_backward(
        lambda lg: mask_loss(lg, boxes, gt_masks, image_idx, matched_idx, labels, weights, mask_sizes=sizes), logits
    )


def box_coder_case(device: str) -> Callable[[], list[Tensor]]:
    R, K, weights = 5, 3, (10.0, 10.0, 5.0, 5.0)
    deltas = torch.randn(R, K * 4, device=device)
    boxes = random_boxes(R, 32.0, 2.0, 16.0).to(device)
    sizes = torch.tensor([[24, 30]], device=device).expand(R, 2)
    scores = torch.rand(R, K, device=device)
    gt = random_boxes(R, 32.0, 2.0, 16.0).to(device)
    coder = BoxCoder(weights)

    def run() -> list[Tensor]:
        decoded, keep = decode_boxes(deltas, boxes, weights, image_sizes=sizes, min_size=1.0, scores=scores,
                                     score_thresh=0.3)  # fmt: skip
        return [
            decoded,
            keep,
            *forward_backward(lambda d, b: decode_boxes(d, b, weights, image_sizes=sizes), deltas, boxes),
            *forward_backward(lambda g, p: encode_boxes(g, p, weights), gt, boxes),
            coder.decode(deltas, [boxes[:2], boxes[2:]]),
            *coder.encode([gt[:2], gt[2:]], [boxes[:2], boxes[2:]]),
        ]

    return run


def nms_case(device: str) -> Callable[[], list[Tensor]]:
    # 80 boxes: more than one 64-box block of the greedy walk.
    B, N = 2, 80
    boxes = random_boxes(B * N, 40.0, 4.0, 20.0).reshape(B, N, 4).to(device)
    scores = torch.rand(B, N, device=device)
    idxs = torch.randint(0, 3, (B, N), device=device)
    valid = torch.rand(B, N, device=device) > 0.1

    def run() -> list[Tensor]:
        return [
            nms(boxes[0], scores[0], 0.5),
            batched_nms(boxes[0], scores[0], idxs[0], 0.5),
            *nms_fixed(boxes, scores, 0.5, 20, valid=valid, idxs=idxs),
            *nms_fixed(boxes, scores, 0.5, 20),
        ]

    return run


def paste_masks_case(device: str) -> Callable[[], list[Tensor]]:
    D, M = 3, 6
    masks = torch.rand(D, 1, M, M, device=device)
    boxes = random_boxes(D, 20.0, 3.0, 12.0).to(device)
    valid = torch.tensor([True, False, True], device=device)

    def run() -> list[Tensor]:
        return [
            *forward_backward(lambda m: paste_masks_in_image(m, boxes, (20, 24)), masks),
            paste_masks_in_image(masks, boxes, (20, 24), threshold=0.5, valid=valid),
        ]

    return run


CASES: dict[str, Case] = {
    "roi_align_avg": roi_align_case("avg", -1, False),
    "roi_align_max": roi_align_case("max", 2, True),
    "multiscale_roi_align_avg": multiscale_case("avg"),
    "multiscale_roi_align_max": multiscale_case("max"),
    "mask_loss": mask_loss_case,
    "box_coder": box_coder_case,
    "nms": nms_case,
    "paste_masks": paste_masks_case,
}


# The factories of the torch namespace that take a device (those ``torch.device(...)`` as a context redirects).
FACTORIES = (
    "arange", "as_tensor", "asarray", "empty", "empty_strided", "eye", "full", "linspace", "logspace", "ones",
    "rand", "randint", "randn", "randperm", "scalar_tensor", "sparse_coo_tensor", "sparse_csr_tensor", "tensor",
    "zeros",
)  # fmt: skip


@contextlib.contextmanager
def allocations_default_to_meta() -> Iterator[None]:
    """Inside the block, a torch factory called without ``device`` allocates on "meta"."""

    def on_meta(factory: Callable[..., Tensor]) -> Callable[..., Tensor]:
        @functools.wraps(factory)
        def call(*args, **kwargs) -> Tensor:
            if kwargs.get("device") is None:
                kwargs["device"] = "meta"
            return factory(*args, **kwargs)

        return call

    with pytest.MonkeyPatch.context() as patch:
        for name in FACTORIES:
            patch.setattr(torch, name, on_meta(getattr(torch, name)))
        yield


def test_the_patch_catches_an_allocation_without_device() -> None:
    x = torch.ones(3)
    with allocations_default_to_meta():
        assert torch.zeros(3).device.type == "meta"
        assert torch.arange(3, device=x.device).device == x.device
        with pytest.raises((RuntimeError, NotImplementedError)):
            (x + torch.arange(3)).tolist()
    assert torch.zeros(3).device == x.device


@pytest.mark.parametrize("name", CASES)
def test_torch_path_allocates_on_the_inputs_device(name: str) -> None:
    call = CASES[name]("cpu")
    with use_backend("torch"):
        expected = call()
        with allocations_default_to_meta():
            got = call()
    assert [t.device.type for t in got] == ["cpu"] * len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True)


@pytest.mark.cuda
@pytest.mark.parametrize("name", CASES)
def test_cuda_torch_path_matches_triton(name: str) -> None:
    call = CASES[name]("cuda")
    expected = call()
    with use_backend("torch"):
        got = call()
    assert [t.device.type for t in got] == ["cuda"] * len(expected)
    for g, e in zip(got, expected, strict=True):
        exact = not g.is_floating_point()  # indices and masks: the same decisions on both paths
        torch.testing.assert_close(g, e, **({"rtol": 0, "atol": 0} if exact else tol(torch.float32)))


@pytest.mark.parametrize("name", CASES)
def test_every_op_call_chooses_its_backend_once(name: str) -> None:
    """One ``backend_for`` per op call, forward and backward (it is host time on every eager call; the CUDA
    path is counted in ``tests/kernels/test_triton_op.py``)."""
    call = CASES[name]("cpu")
    # The torch path: the same routing as the interpreted kernels' (the opaque op), without the profile hook
    # slowing the interpreter (6-7 s a case).
    ops = CountedOps(lambda op: op.namespace == "mrcnn")
    with use_backend("torch"), ops, counted_calls(backend_for) as choices:
        call()
    assert ops.count > 0 and len(choices) == ops.count
