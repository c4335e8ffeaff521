"""RoIAlign's torch path traces into plain aten ops (an AOTInductor package on CPU with no custom op).

``torch.export`` keeps our ops opaque (their fake implementations); ``run_decompositions`` with an op's python
implementation then traces the torch path under fake tensors. The graph must hold no ``mrcnn`` op and compute what
eager computes. Adaptive sampling has a data-dependent sample grid and must refuse tracing with a clear error.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import Tensor, nn

import kernels
from kernels import use_backend
from tests.kernels.test_multiscale_roi_align import pyramid, random_rois
from tests.tolerances import tol

# kernels.roi_align is also the public function: the module is imported by name.
roi_align_module = importlib.import_module("kernels.roi_align")
roi_align_torch = importlib.import_module("kernels._roi_align_torch")
# What mrcnn.export uses, plus the backward op (not in a package: only the eval graph is exported).
DECOMPOSITIONS = {
    **kernels.cpu_decompositions(),
    torch.ops.mrcnn.multiscale_roi_align_backward.default: roi_align_module._multiscale_backward_op.impl,
}
SCALES = [1 / 4, 1 / 8, 1 / 16, 1 / 32]


class MultiScale(nn.Module):
    def __init__(self, sampling_ratio: int, pool_mode: str, aligned: bool) -> None:
        super().__init__()
        self.sampling_ratio, self.pool_mode, self.aligned = sampling_ratio, pool_mode, aligned

    def forward(self, p2: Tensor, p3: Tensor, p4: Tensor, p5: Tensor, rois: Tensor, valid: Tensor) -> Tensor:
        return kernels.multiscale_roi_align(
            [p2, p3, p4, p5], rois, 7, SCALES, self.sampling_ratio, valid=valid, aligned=self.aligned,
            pool_mode=self.pool_mode,
        )  # fmt: skip


class SingleLevel(nn.Module):
    def __init__(self, sampling_ratio: int, pool_mode: str) -> None:
        super().__init__()
        self.sampling_ratio, self.pool_mode = sampling_ratio, pool_mode

    def forward(self, x: Tensor, rois: Tensor) -> Tensor:
        return kernels.roi_align(x, rois, (5, 4), 0.5, self.sampling_ratio, pool_mode=self.pool_mode)


class MultiScaleBackward(nn.Module):
    """The backward op alone: what a training graph (or a joint export) runs after the forward."""

    def __init__(self, pool_mode: str, level_sizes: list[int]) -> None:
        super().__init__()
        self.pool_mode, self.level_sizes = pool_mode, level_sizes

    def forward(self, grad: Tensor, rois: Tensor, valid: Tensor, argmax: Tensor) -> list[Tensor]:
        return torch.ops.mrcnn.multiscale_roi_align_backward(
            grad, rois, valid, argmax, SCALES, 7, 7, 2, False, self.pool_mode, 224.0, 4.0, 2, self.level_sizes, False
        )


def multiscale_inputs(dtype: torch.dtype = torch.float32) -> tuple[Tensor, ...]:
    """A 4-level pyramid of 2 images 256x320, and 24 RoIs over every level, 3 padded and 2 not finite."""
    rois = random_rois(2, 24, 256, 320, 8, 300)
    rois[5, 1] = float("nan")
    rois[9, 3] = float("inf")
    valid = torch.ones(24, dtype=torch.bool)
    valid[[0, 11, 23]] = False
    return (*pyramid(2, 6, 256, 320, dtype=dtype), rois, valid)


def decomposed(module: nn.Module, args: tuple) -> torch.export.ExportedProgram:
    with use_backend("torch"):
        return torch.export.export(module, args).run_decompositions(DECOMPOSITIONS)


def mrcnn_ops(ep: torch.export.ExportedProgram) -> list[str]:
    return [
        str(n.target)
        for n in ep.graph.nodes
        if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "mrcnn"
    ]


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("pool_mode", ["avg", "max"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
def test_multiscale_exports_to_aten(dtype: torch.dtype, pool_mode: str, aligned: bool) -> None:
    module, args = MultiScale(2, pool_mode, aligned), multiscale_inputs(dtype)
    ep = decomposed(module, args)
    assert mrcnn_ops(ep) == []
    with use_backend("torch"):
        eager = module(*args)
    torch.testing.assert_close(ep.module()(*args), eager, **tol(dtype))
    assert eager[[0, 5, 9, 11, 23]].eq(0).all()  # padded and non-finite RoIs: zeros, traced too


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_roi_align_exports_to_aten(pool_mode: str) -> None:
    module = SingleLevel(2, pool_mode)
    x = torch.randn(2, 5, 12, 14)
    rois = torch.cat([torch.randint(0, 2, (9, 1)).float(), torch.rand(9, 2) * 20, torch.rand(9, 2) * 20 + 8], dim=1)
    ep = decomposed(module, (x, rois))
    assert mrcnn_ops(ep) == []
    with use_backend("torch"):
        eager = module(x, rois)
    torch.testing.assert_close(ep.module()(x, rois), eager, **tol(torch.float32))


@pytest.mark.parametrize("pool_mode", ["avg", "max"])
def test_backward_exports_to_aten(pool_mode: str) -> None:
    *features, rois, valid = multiscale_inputs()
    with use_backend("torch"):
        argmax = torch.ops.mrcnn.multiscale_roi_align(
            features, rois, valid, SCALES, 7, 7, 2, False, pool_mode, 224.0, 4.0
        )[1]
        grad = torch.randn(rois.shape[0], 6, 7, 7)
        module = MultiScaleBackward(pool_mode, [s for f in features for s in f.shape[2:]])
        eager = module(grad, rois, valid, argmax)
    ep = decomposed(module, (grad, rois, valid, argmax))
    assert mrcnn_ops(ep) == []
    torch.testing.assert_close(ep.module()(grad, rois, valid, argmax), eager, **tol(torch.float32))


@pytest.mark.parametrize("sampling_ratio", [0, -1])
def test_adaptive_sampling_refuses_tracing(sampling_ratio: int) -> None:
    """Adaptive sampling pads RoIs to the call's largest grid, a size read from the data: a clear error."""
    with pytest.raises(ValueError, match="fixed sampling_ratio > 0"):
        decomposed(MultiScale(sampling_ratio, "avg", False), multiscale_inputs())
    x, rois = torch.randn(1, 3, 8, 8), torch.tensor([[0.0, 1.0, 1.0, 9.0, 7.0]])
    with pytest.raises(ValueError, match="fixed sampling_ratio > 0"):
        decomposed(SingleLevel(sampling_ratio, "max"), (x, rois))


@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_chunks_match_one_pass(monkeypatch: pytest.MonkeyPatch, mode: str, sampling_ratio: int) -> None:
    """RoIs split into several chunks (a bound of a few RoIs' intermediates) give what one pass gives."""
    *features, rois, valid = multiscale_inputs(torch.float64)
    grad = torch.randn(rois.shape[0], 6, 7, 7, dtype=torch.float64)

    def run() -> tuple[Tensor, list[Tensor]]:
        leaves = [f.clone().requires_grad_(True) for f in features]
        with use_backend("torch"):  # the backward too: it picks its backend when it runs
            out = kernels.multiscale_roi_align(leaves, rois, 7, SCALES, sampling_ratio, valid=valid, pool_mode=mode)
            return out, list(torch.autograd.grad(out, leaves, grad))

    out, grads = run()
    monkeypatch.setattr(roi_align_torch, "_CHUNK_ELEMENTS", 7 * 7 * 4 * 6 * 5)  # a few RoIs per chunk
    chunked_out, chunked_grads = run()
    torch.testing.assert_close(chunked_out, out, **tol(torch.float64))
    torch.testing.assert_close(chunked_grads, grads, **tol(torch.float64))
