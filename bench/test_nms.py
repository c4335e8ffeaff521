"""NMS benchmarks: torchvision's ``batched_nms`` (one call per image, as its RPN and box head do) against our
``nms_fixed`` (all images in one call, fixed-size output, no host synchronisation).

Providers:
* ``torchvision``: per image ``torchvision.ops.batched_nms(boxes, scores, idxs, thr)[:max_out]``. On CUDA
  each call copies its IoU mask to the host and walks it there (a synchronisation per image).
* ``ours``: ``kernels.nms.nms_fixed(boxes, scores, thr, max_out, idxs=idxs)`` on the whole batch: the IoU mask
  and the greedy walk both on the device, ``(keep, keep_valid)`` of fixed shape, zero host syncs (the
  callable only synchronises at its end for the timer, as the torchvision one does).

Shapes (``mode``), 2 images:
* ``rpn``: the RPN's proposals after the per-level top-k: 5 levels x 2000 = 10000 boxes per image, the level
  as class, IoU 0.7, the first 2000 kept (torchvision's training settings). The target is >= 1.5x.
* ``detections``: the box head's candidates at evaluation: 4000 boxes per image over 90 classes, IoU 0.5,
  the first 100 kept.

CPU (the torch path; TRITON_INTERPRET is not set here): 5 x 200 and 400 boxes per image.

``test_batched_nms_cpu`` (on the CPU whatever the device, one thread): what a drop-in user calls,
``torchvision.ops.batched_nms`` (its C++ kernel; per class above 1000 boxes) against ``kernels.batched_nms``
(the torch path), one image of 1,000-50,000 boxes in 1-90 classes (``CPU_CASES``), IoU 0.5.

Run: ``python -m pytest bench/test_nms.py`` (``--benchmark-disable`` for a quick smoke run).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchvision

from bench import coco_shapes
from kernels._backend import use_backend
from kernels.nms import batched_nms, nms_fixed

PROVIDERS = ("torchvision", "ours")
MODES = ("rpn", "detections")
BATCH = 2
SETTINGS = {
    # mode: (boxes per image on CUDA, on CPU, classes, IoU threshold, max_out)
    "rpn": (10000, 1000, 5, 0.7, 2000),
    "detections": (4000, 400, 90, 0.5, 100),
}


def clustered(batch: int, n: int, classes: int, runs: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(boxes [batch, n, 4], scores [batch, n], idxs [batch, n])`` on the CPU: boxes clustered around 60
    objects of an 800 x 1333 image (so that NMS removes many), class ids in contiguous runs (``runs``: the RPN's
    levels) or random."""
    gen = torch.Generator().manual_seed(0)
    objects = torch.rand(batch, 60, 4, generator=gen) * torch.tensor([1333.0, 800.0, 300.0, 300.0]) + 10
    which = torch.randint(0, 60, (batch, n), generator=gen)
    obj = objects.gather(1, which[..., None].expand(batch, n, 4))
    ctr = obj[..., :2] + torch.randn(batch, n, 2, generator=gen) * obj[..., 2:] * 0.15
    size = obj[..., 2:] * (1 + torch.randn(batch, n, 2, generator=gen) * 0.15).clamp(min=0.2)
    # On a 1/8 pixel grid: torchvision's class offsets (its batched_nms trick) stay exact, so both providers
    # see the same IoUs.
    boxes = torch.round(torch.cat([ctr - size / 2, ctr + size / 2], dim=2) * 8) / 8
    scores = torch.rand(batch, n, generator=gen)
    if runs:
        idxs = torch.arange(classes).repeat_interleave(n // classes)[None].expand(batch, n).contiguous()
    else:
        idxs = torch.randint(0, classes, (batch, n), generator=gen)
    return boxes, scores, idxs


def make_inputs(device: str, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(boxes [B, N, 4], scores [B, N], idxs [B, N])`` of ``mode`` (``clustered``) on ``device``."""
    n_cuda, n_cpu, classes, _, _ = SETTINGS[mode]
    inputs = clustered(BATCH, n_cuda if coco_shapes(device) else n_cpu, classes, runs=mode == "rpn")
    return tuple(t.to(device) for t in inputs)


def setup_nms(provider: str, mode: str = "rpn", device: str | None = None) -> Callable[[], list[torch.Tensor]]:
    """A callable running the batch's NMS with ``provider`` -> the kept indices of each image (synchronised on
    CUDA; for ``ours`` the unpadding happens outside the timed callable)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    boxes, scores, idxs = make_inputs(device, mode)
    _, _, _, thr, max_out = SETTINGS[mode]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if provider == "torchvision":

        def run() -> tuple[torch.Tensor, ...]:
            return tuple(torchvision.ops.batched_nms(boxes[b], scores[b], idxs[b], thr)[:max_out] for b in range(BATCH))

    elif provider == "ours":

        def run() -> tuple[torch.Tensor, ...]:
            return nms_fixed(boxes, scores, thr, max_out, idxs=idxs)

    else:
        raise ValueError(f"unknown provider {provider!r}")

    def step() -> tuple[torch.Tensor, ...]:
        out = run()
        sync()
        return out

    return step


def nms_info(provider: str, mode: str, device: str | None = None) -> dict:
    """The benchmark's ``extra_info``; ``bytes``: read boxes, scores and class ids once, write the kept slots."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    n_cuda, n_cpu, classes, thr, max_out = SETTINGS[mode]
    N = n_cuda if coco_shapes(device) else n_cpu
    return dict(
        op="nms",
        shape=f"{BATCH}x{N}->{max_out}",
        dtype="float32",
        mode=mode,
        provider=provider,
        bytes=BATCH * (N * (16 + 4 + 8) + max_out * 9),
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_nms(benchmark, provider: str, mode: str) -> None:
    fn = setup_nms(provider, mode)
    fn()  # warm-up: compiles the kernels on CUDA
    info = nms_info(provider, mode)
    benchmark.group = f"nms-{mode}"
    benchmark.extra_info.update(info)
    benchmark(fn)


@pytest.mark.parametrize("mode", MODES)
def test_providers_agree(mode: str) -> None:
    """Ours keeps exactly torchvision's boxes in torchvision's order (guards against timing a wrong path)."""
    keep, keep_valid = setup_nms("ours", mode)()
    expected = setup_nms("torchvision", mode)()
    for b, ref in enumerate(expected):
        assert torch.equal(keep[b][keep_valid[b]], ref)


# ---------------------------------------------------------------------------------------------------------------
# batched_nms on the CPU, one thread: the drop-in call
# ---------------------------------------------------------------------------------------------------------------

CPU_CASES = {  # name: (boxes, classes); class ids random
    "1000x1": (1000, 1),
    "1000x90": (1000, 90),
    "4000x5": (4000, 5),
    "10000x90": (10000, 90),
    "50000x1": (50000, 1),
    "50000x90": (50000, 90),
}
CPU_IOU = 0.5


def setup_batched_nms_cpu(provider: str, case: str) -> Callable[[], torch.Tensor]:
    """A callable: ``provider``'s ``batched_nms`` of one CPU image of ``CPU_CASES[case]`` (ours on the torch path,
    whatever TRITON_INTERPRET says)."""
    n, classes = CPU_CASES[case]
    boxes, scores, idxs = (t[0] for t in clustered(1, n, classes, runs=False))
    if provider == "torchvision":
        return lambda: torchvision.ops.batched_nms(boxes, scores, idxs, CPU_IOU)
    if provider == "ours":

        def run() -> torch.Tensor:
            with use_backend("torch"):
                return batched_nms(boxes, scores, idxs, CPU_IOU)

        return run
    raise ValueError(f"unknown provider {provider!r}")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CPU_CASES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_batched_nms_cpu(benchmark, one_thread, provider: str, case: str) -> None:
    fn = setup_batched_nms_cpu(provider, case)
    n, classes = CPU_CASES[case]
    benchmark.group = "nms-cpu"
    benchmark.extra_info.update(
        op="batched_nms", shape=f"{n}x{classes}", dtype="float32", mode="cpu-1-thread", provider=provider,
        bytes=n * (16 + 4 + 8),
    )  # fmt: skip
    benchmark(fn)


@pytest.mark.parametrize("case", CPU_CASES)
def test_batched_nms_cpu_providers_agree(case: str) -> None:
    assert torch.equal(setup_batched_nms_cpu("ours", case)(), setup_batched_nms_cpu("torchvision", case)())
