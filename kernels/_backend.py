"""Which implementation serves a tensor, and how an op is declared.

Backend choice: CUDA tensors run the Triton kernels; CPU tensors run the torch implementation of the same
math, unless the process runs Triton's interpreter (``TRITON_INTERPRET=1`` set before ``kernels`` is imported,
read once since ``triton.jit`` decides at decoration time): then the Triton kernels run on the CPU, which is
how CI tests every kernel. ``use_backend("torch" | "triton")`` forces one for the ops called inside it.

Declaration: ``@triton_custom_op(name, autocast=..., traceable=..., inline_on_cuda=...)`` over an op's body
states every fact of the op in one place and registers it (``TritonCustomOp``); its fake and autograd follow
with torch.library's own ``register_fake`` / ``register_autograd``. The body takes the op's arguments and a
keyword-only ``backend`` (``backend_for`` of its first tensor, resolved once per call by the registration).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch._library.infer_schema import infer_schema
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.fake_tensor import is_fake

from ._triton_utils import INTERPRET

__all__ = ["backend_for", "use_backend", "triton_custom_op", "cpu_decompositions", "LINEAR_KERNEL_ANALYSIS", "OPS"]

_forced: list[str] = []


def backend_for(t: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: the implementation an op would run for tensor ``t``.

    While ``torch.compile`` / ``torch.export`` trace an op (fake tensors), a CPU tensor always takes the
    torch path: interpreted kernels cannot run on fake tensors (``wrap_triton`` needs data pointers), and
    tracing the torch path is what makes a CPU graph or AOTInductor package pure aten. CUDA tensors keep
    the Triton kernels, which inductor then launches from its generated code.
    """
    cuda = t.is_cuda
    # The common case first, without ``is_fake`` where it cannot matter: it took 3.0 us of the 4.8 us this
    # function took per call when it checked it first (CPU tensor, timeit, busy 2-core CPU); now 0.16 us.
    if not _forced:
        return "triton" if cuda or (INTERPRET and not is_fake(t) and t.device.type == "cpu") else "torch"
    if not cuda and is_fake(t) and t.device.type == "cpu":
        return "torch"
    forced = _forced[-1]
    if forced == "triton" and not (cuda or (INTERPRET and t.device.type == "cpu")):
        raise RuntimeError(
            f"the Triton backend needs a CUDA tensor or TRITON_INTERPRET=1 for CPU tensors; got {t.device}"
        )
    return forced


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``"torch"`` or ``"triton"`` for the ops called inside the ``with`` block."""
    if name not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton', got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _first_tensor(args: Sequence[object]) -> torch.Tensor:
    """The first tensor of an op's arguments (inside lists too), which decides its backend: every op takes one
    first, and the ops check that all their tensors share its device."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    raise TypeError("an op of this package takes a tensor")


# Inductor works out which tensors a user kernel writes by walking its TTIR. From torch 2.12 that walk counts every
# path through the dataflow graph without memoising shared nodes (pytorch/pytorch#193703, open): exponential in
# the sharing depth. Measured (tests/kernels/fake_cuda_graphs.py, torch 2.14): every kernel of ours under 1 s,
# except NMS, still running after 100 s. torch 2.11 walks with a visited set.
LINEAR_KERNEL_ANALYSIS = torch.__version__ < torch.torch_version.TorchVersion("2.12")

Autocast = Literal["float32", "keep"]
_AUTOCAST_LIB = torch.library.Library("mrcnn", "IMPL")
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _upcast(value: object, device: str) -> object:
    """torchvision's autocast cast (``cached_cast(kFloat, ...)``): float16/bfloat16 tensors on ``device`` to
    float32, inside lists too; everything else as it is."""
    if isinstance(value, torch.Tensor):
        half = value.dtype in (torch.float16, torch.bfloat16) and value.device.type == device
        return value.float() if half else value
    if isinstance(value, (list, tuple)):
        return type(value)(_upcast(v, device) for v in value)
    return value


def _register_autocast(name: str, rule: Autocast) -> None:
    """The autocast rule of ``torch.ops.mrcnn.<name>`` on CPU and CUDA (torchvision registers one for each of its
    ops on both): the op runs with autocast off, so the torch paths' matmuls are not lowered to half precision;
    ``"float32"`` casts float16/bfloat16 inputs to float32 first, ``"keep"`` passes them as they are."""
    op = getattr(torch.ops.mrcnn, name).default
    for device in ("cpu", "cuda"):

        def kernel(_keyset: torch._C.DispatchKeySet, *args: object, device: str = device) -> object:
            with torch.autocast(device, enabled=False):
                return op(*(_upcast(a, device) for a in args)) if rule == "float32" else op(*args)

        _AUTOCAST_LIB.impl(name, kernel, _AUTOCAST_KEYS[device], with_keyset=True)


class TritonCustomOp:
    """An op registered twice, so that compiled graphs launch our CUDA kernels themselves and nothing else
    changes.

    * ``mrcnn::<name>``, the op users and autograd see, is a ``torch.library.triton_op``. Eager calls run
      the body. When ``torch.compile`` / AOTInductor functionalize a graph they trace into it: for CUDA
      tensors that take the Triton backend, the body's launches (``_triton_utils.wrap_triton``) become
      user-defined Triton kernels in inductor's generated code, so a CUDA AOTInductor package holds our
      kernels and loads without Python.
    * every other call (CPU tensors, the interpreter, ``use_backend("torch")`` on CUDA, and CUDA calls of an op
      declared ``inline_on_cuda=False``) goes to ``mrcnn::<name>_opaque``, a plain ``custom_op`` running
      ``impl`` (the body with its backend chosen), which compiled graphs keep as one node. Traced into instead,
      a CPU call would meet the interpreter (which cannot run on fake tensors) or a torch path with
      data-dependent sizes (RoIAlign's adaptive sampling grid, the mask loss's crop size).

    The fake registered with ``register_fake`` serves both ops, so Dynamo's shape propagation never runs a
    launcher (``tests/kernels/test_triton_op.py`` traces every op over fake CUDA tensors).
    """

    def __init__(self, name: str, body: Callable[..., object], autocast: Autocast, traceable: bool,
                 inline_on_cuda: bool) -> None:  # fmt: skip
        self.name, self.traceable, self.inline_on_cuda = name, traceable, inline_on_cuda
        # The op's signature is the body's without its keyword-only ``backend``, types evaluated (torch 2.11's
        # triton_op infers the schema from the function it wraps, evaluating string annotations in its module).
        signature = inspect.signature(body, eval_str=True)
        signature = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "backend"])

        @functools.wraps(body)
        def impl(*args: object) -> object:
            return body(*args, backend=backend_for(_first_tensor(args)))

        impl.__signature__ = signature
        self.impl = impl
        schema = infer_schema(impl, mutates_args=())

        @functools.wraps(body)
        def launch_directly(*args: object) -> object:
            # No graph traces into an opaque call, so its launches skip wrap_triton's higher-order op (~1 ms per
            # launch in eager mode, torch's docs), as triton_op does for eager calls.
            with set_wrap_triton_enabled(False):
                return impl(*args)

        self.opaque = torch.library.custom_op(f"mrcnn::{name}_opaque", launch_directly, mutates_args=(), schema=schema)
        opaque = getattr(torch.ops.mrcnn, f"{name}_opaque").default

        @functools.wraps(body)
        def impl_or_opaque(*args: object) -> object:
            # One backend_for per call: here for CUDA tensors (inlined when Triton serves them), in the opaque
            # op's ``impl`` for the others.
            t = _first_tensor(args)
            if inline_on_cuda and t.is_cuda and (backend := backend_for(t)) == "triton":
                return body(*args, backend=backend)
            return opaque(*args)

        impl_or_opaque.__signature__ = signature
        self.op = torch.library.triton_op(f"mrcnn::{name}", impl_or_opaque, mutates_args=(), schema=schema)
        _register_autocast(name, autocast)

    def register_fake(self, fake: Callable[..., object]) -> Callable[..., object]:
        self.opaque.register_fake(fake)
        self.op.register_fake(fake)
        return fake

    def register_autograd(self, backward: Callable[..., object], *, setup_context: Callable[..., object]) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)


OPS: dict[str, TritonCustomOp] = {}


def triton_custom_op(
    name: str, *, autocast: Autocast, traceable: bool = False, inline_on_cuda: bool = True
) -> Callable[[Callable[..., object]], TritonCustomOp]:
    """Decorator: declare ``body`` as ``torch.ops.mrcnn.<name>``, its type hints giving the schema, less its
    keyword-only ``backend: str`` (``"triton"`` or ``"torch"``, chosen once per call).

    * ``autocast``: ``"float32"`` casts float16/bfloat16 inputs to float32 under autocast (torchvision's rule for
      ``nms``), ``"keep"`` runs the op on its inputs' dtypes; either way with autocast off inside.
    * ``traceable``: the torch path traces over fake CPU tensors into static-shape aten ops, so
      ``cpu_decompositions()`` decomposes the op (``tests/kernels/test_decompose.py``).
    * ``inline_on_cuda=False``: CUDA calls stay opaque too, where no graph can trace into the op (an output size
      that is the data's, or a kernel inductor cannot analyse).
    """

    def register(body: Callable[..., object]) -> TritonCustomOp:
        OPS[name] = TritonCustomOp(name, body, autocast, traceable, inline_on_cuda)
        return OPS[name]

    return register


def cpu_decompositions() -> dict:
    """``{torch.ops.mrcnn.<op>.default: its Python implementation}`` for ``ExportedProgram.run_decompositions``,
    for every op declared ``traceable``.

    ``torch.export`` keeps each of our ops as one node, which a CPU AOTInductor package could only call back
    through this project. Decomposed with its own implementation, an op is traced on fake CPU tensors, which
    take the torch path (``backend_for``): the graph then holds aten ops only. RoIAlign's adaptive sampling has
    a data-dependent sample grid and raises a ``ValueError`` when traced (a fixed ``sampling_ratio`` traces).
    """
    return {getattr(torch.ops.mrcnn, name).default: op.impl for name, op in OPS.items() if op.traceable}
