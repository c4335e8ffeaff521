"""CUDA graphs: a function of tensors captured once per input shape and replayed, so that the host launches
one graph instead of every kernel (~200 launches per training step, 10-40 us of host time each).

``Captured(fn)`` is ``fn`` over a pytree of tensors, with the CUDA-graph life cycle around it: for each new
input signature (structure, shapes, dtypes) it runs ``fn`` eagerly ``warmup`` times on a side stream (what
CUDA libraries initialise lazily, and Triton's autotuning, happen there and not in the capture), then captures
``fn`` on copies of the inputs (the graph's *static inputs*, allocated outside the graph), and from then on
copies each call's inputs into them and replays. When a capture fails, it says why in one line and runs
``fn`` eagerly from then on. Capturing needs what ``MaskRCNN.forward`` guarantees: no host read and no
data-dependent shape inside ``fn``.

A graph per padded input size (``mrcnn.collate`` pads to multiples of ``size_divisible``, the export's size
rule): a fixed-size dataset needs one, COCO's aspect ratios a few dozen. They share one memory pool, which is
safe because nothing a replay leaves in the pool is needed by the next: the state carried from step to step
(parameters, optimizer state, buffers, the learning rate) lives outside it, allocated by the eager warm-up,
and the outputs are copied out (or consumed) before the next replay. The pool is then as large as the
largest graph's, not the sum.

What the graph reads stays where it was at capture: parameters updated in place (optimizer steps,
``load_state_dict``) are seen by the next replay; tensors replaced (``model.to()``, a new optimizer) are not,
and need a new ``Captured``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["Captured", "copy_into", "cuda_graphs_enabled", "signature"]


def cuda_graphs_enabled(option: str, device: torch.device, *, what: str, distributed: bool = False,
                        static_model: bool = True) -> bool:  # fmt: skip
    """``--cuda-graphs auto|on|off`` for ``what`` ("the training step", "inference"): auto is on with CUDA. Where
    it cannot be on (no CUDA device; DDP, whose gradient all-reduce is not captured here; a model without a
    static forward, such as torchvision's) it says so in one line, unless it was ``auto`` without CUDA, and the
    run goes on eagerly."""
    if option == "off" or (option == "auto" and device.type != "cuda"):
        return False
    reason = None
    if device.type != "cuda":
        reason = f"{device} is not a CUDA device"
    elif distributed:
        reason = "DistributedDataParallel's gradient all-reduce is not captured"
    elif not static_model:
        reason = "the model has no static-shape forward to capture"
    if reason is None:
        return True
    # Here the option is "on", or "auto" with CUDA: either way the user expects graphs.
    print(f"--cuda-graphs: {what} runs eager: {reason}", file=sys.stderr, flush=True)
    return False


def signature(inputs: Any) -> tuple:
    """What a graph is specific to: the pytree structure and each tensor's shape, dtype and device."""
    leaves, spec = pytree.tree_flatten(inputs)
    return str(spec), tuple(
        (tuple(x.shape), x.dtype, x.device) if isinstance(x, Tensor) else ("value", x) for x in leaves
    )


def copy_into(static: Any, inputs: Any) -> None:
    """Copy every tensor of ``inputs`` into the tensor at the same place in ``static`` (same structure and shapes;
    across devices too, without waiting when the source is pinned)."""
    for dst, src in zip(pytree.tree_leaves(static), pytree.tree_leaves(inputs), strict=True):
        if isinstance(dst, Tensor):
            dst.copy_(src, non_blocking=True)


def _on_device(inputs: Any, device: torch.device) -> Any:
    """A fresh copy of ``inputs`` on ``device`` (the static inputs of a graph: allocated outside it), queued
    without waiting (the DataLoader pins batches on CUDA)."""
    return pytree.tree_map_only(Tensor, lambda t: t.to(device, non_blocking=True, copy=True), inputs)


class CudaGraph:
    """The CUDA side of ``Captured``: eager runs on a side stream, and capture into a ``torch.cuda.CUDAGraph``
    drawing on one memory pool shared by the ``Captured``'s graphs (module docstring)."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def run_eager(self, fn: Callable[[Any], Any], inputs: Any) -> Any:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = fn(inputs)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def capture(self, fn: Callable[[Any], Any], static_inputs: Any) -> tuple[Callable[[], None], Any]:
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread allocates pinned memory meanwhile, which the default
        # ("global") mode forbids to every thread of the process during a capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = fn(static_inputs)
        return graph.replay, out


class Captured:
    """``fn(inputs)`` replayed from a CUDA graph per input signature (module docstring).

    ``device``: where the static inputs live (the inputs may come from the CPU, pinned). ``reset()`` runs before
    each capture and after a failed one (the trainer drops the gradients there, so that the graph's backward
    allocates them from its pool, and forgets what a failed capture left behind). ``copy_outputs``: return a
    copy of the graph's outputs (inference) rather than the static outputs themselves, which the next replay
    overwrites. ``graphs`` is the CUDA implementation; tests pass a stand-in to check this life cycle on a CPU.
    """

    def __init__(self, fn: Callable[[Any], Any], *, device: torch.device, what: str, warmup: int = 1,
                 reset: Callable[[], None] | None = None, copy_outputs: bool = False,
                 graphs: Any = None) -> None:  # fmt: skip
        self.fn, self.device, self.what, self.warmup = fn, device, what, warmup
        self.reset, self.copy_outputs = reset, copy_outputs
        self.graphs = graphs if graphs is not None else CudaGraph()
        self.entries: dict[tuple, tuple[Any, Callable[[], None], Any]] = {}  # signature -> static in, replay, out
        self.eager_runs: dict[tuple, int] = {}
        self.failed: str | None = None

    def __call__(self, inputs: Any) -> Any:
        if self.failed is not None:
            return self.fn(_on_device(inputs, self.device))
        key = signature(inputs)
        entry = self.entries.get(key)
        if entry is None:
            if self.eager_runs.get(key, 0) < self.warmup:
                self.eager_runs[key] = self.eager_runs.get(key, 0) + 1
                return self.graphs.run_eager(self.fn, _on_device(inputs, self.device))
            entry = self._capture(key, inputs)
            if entry is None:
                return self.fn(_on_device(inputs, self.device))
        static_inputs, replay, out = entry
        copy_into(static_inputs, inputs)
        replay()
        return pytree.tree_map_only(Tensor, torch.clone, out) if self.copy_outputs else out

    def _capture(self, key: tuple, inputs: Any) -> tuple[Any, Callable[[], None], Any] | None:
        static_inputs = _on_device(inputs, self.device)
        if self.reset is not None:
            self.reset()
        try:
            replay, out = self.graphs.capture(self.fn, static_inputs)
        except RuntimeError as e:
            if self.reset is not None:
                self.reset()
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.failed = f"{type(e).__name__}: {first_line}"
            print(f"--cuda-graphs: capturing {self.what} failed ({self.failed}); running eager", file=sys.stderr,
                  flush=True)  # fmt: skip
            return None
        self.entries[key] = (static_inputs, replay, out)
        return self.entries[key]
