"""Which implementation serves a tensor: the Triton kernels or the vectorized torch path.

* CUDA tensors run the Triton kernels.
* CPU tensors run the torch implementation of the same math, unless the process runs Triton's
  interpreter (``TRITON_INTERPRET=1`` set before ``kernels`` is imported): then they run the Triton
  kernels on the CPU, which is how CI tests every kernel.
* ``use_backend("torch" | "triton")`` forces one for the ops called inside it (tests compare the two
  paths in one process; benchmarks pin the torch path on CPU).

Also the conventions every op shares: its registration (``triton_custom_op``), its argument errors
(``OpValueError`` / ``OpTypeError``) and its autocast rule (``register_autocast``).

The interpreter flag is read once, at import, because ``triton.jit`` decides at decoration time
whether a kernel is compiled or interpreted.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import os
from collections.abc import Callable, Iterator, Sequence

import torch
import triton
import triton.language as tl
from torch._library.infer_schema import infer_schema
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.fake_tensor import is_fake

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

_forced: list[str] = []


def backend_for(t: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: the implementation an op would run for tensor ``t``.

    While ``torch.compile`` / ``torch.export`` trace an op (fake tensors), a CPU tensor always takes the
    torch path: interpreted kernels cannot run on fake tensors (``wrap_triton`` needs data pointers), and
    tracing the torch path is what makes a CPU graph or AOTInductor package pure aten. CUDA tensors keep
    the Triton kernels, which inductor then launches from its generated code.
    """
    if t.device.type == "cpu" and is_fake(t):
        return "torch"
    if _forced:
        forced = _forced[-1]
        if forced == "triton" and not (t.is_cuda or (INTERPRET and t.device.type == "cpu")):
            raise RuntimeError(
                f"the Triton backend needs a CUDA tensor or TRITON_INTERPRET=1 for CPU tensors; got {t.device}"
            )
        return forced
    if t.is_cuda:
        return "triton"
    return "triton" if INTERPRET and t.device.type == "cpu" else "torch"


def _first_tensor(args: Sequence[object]) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, (list, tuple)):
            a = _first_tensor(a)
        if isinstance(a, torch.Tensor):
            return a
    return None


class TritonCustomOp:
    """An op registered twice, so that compiled graphs launch our CUDA kernels themselves and nothing else
    changes.

    * ``mrcnn::<name>``, the op users and autograd see, is a ``torch.library.triton_op``. Eager calls run
      ``impl``. When ``torch.compile`` / AOTInductor functionalize a graph they trace into it: for CUDA
      tensors that take the Triton backend, ``impl``'s launches (``wrap_triton``, ``kernels._triton_utils``)
      become user-defined Triton kernels in inductor's generated code, so a CUDA AOTInductor package holds our
      kernels and loads without Python.
    * every other call (CPU tensors, the interpreter, ``use_backend("torch")`` on CUDA) goes to
      ``mrcnn::<name>_opaque``, a plain ``custom_op`` with the same ``impl``: compiled graphs keep it as one
      node with a shape-only fake, as before. Traced into instead, a CPU call would meet the interpreter
      (which cannot run on fake tensors) or a torch path with data-dependent sizes (RoIAlign's adaptive
      sampling grid, the mask loss's crop size). A CPU export decomposes ``mrcnn::<name>`` into aten ops
      explicitly, with ``cpu_decompositions()``, where the torch path is traceable.

    Measured on CPU: ``torch.export`` keeps a ``triton_op`` as one node; functionalized over fake CUDA
    tensors (what inductor does), ``mrcnn::<name>`` leaves only ``triton_kernel_wrapper_functional`` nodes
    (``tests/kernels/test_triton_op.py``). The fake registered with ``register_fake`` serves both ops, so
    Dynamo's shape propagation never runs a launcher.
    """

    def __init__(self, name: str, impl: Callable[..., object], inline_on_cuda: bool) -> None:
        self.impl = impl
        schema = infer_schema(impl, mutates_args=())

        @functools.wraps(impl)
        def launch_directly(*args: object) -> object:
            # No graph traces into an opaque call, so its launches skip wrap_triton's higher-order op (~1 ms per
            # launch in eager mode, torch's docs), as triton_op does for eager calls.
            with set_wrap_triton_enabled(False):
                return impl(*args)

        self.opaque = torch.library.custom_op(f"mrcnn::{name}_opaque", launch_directly, mutates_args=(), schema=schema)
        opaque = getattr(torch.ops.mrcnn, f"{name}_opaque").default

        @functools.wraps(impl)
        def impl_or_opaque(*args: object) -> object:
            t = _first_tensor(args)
            if inline_on_cuda and t is not None and t.is_cuda and backend_for(t) == "triton":
                return impl(*args)
            return opaque(*args)

        # torch 2.11's triton_op infers the schema from the function it wraps (ignoring ``schema``), evaluating
        # string annotations in that function's module: give it ``impl``'s signature with the types evaluated.
        impl_or_opaque.__signature__ = inspect.signature(impl, eval_str=True)
        self.op = torch.library.triton_op(f"mrcnn::{name}", impl_or_opaque, mutates_args=(), schema=schema)

    def register_fake(self, fake: Callable[..., object]) -> Callable[..., object]:
        self.opaque.register_fake(fake)
        self.op.register_fake(fake)
        return fake

    def register_autograd(self, backward: Callable[..., object], *, setup_context: Callable[..., object]) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)


_OPS: dict[str, TritonCustomOp] = {}
# Inductor works out which tensors a user kernel writes by walking its TTIR. From torch 2.12 that walk counts every
# path through the dataflow graph without memoising shared nodes (pytorch/pytorch#193703, open): exponential in
# the sharing depth. Measured here (tests/kernels/fake_cuda_graphs.py, torch 2.14): every kernel of ours takes
# under 1 s, except NMS, still running after 100 s. torch 2.11 walks with a visited set.
LINEAR_KERNEL_ANALYSIS = torch.__version__ < torch.torch_version.TorchVersion("2.12")


def triton_custom_op(name: str, *, inline_on_cuda: bool = True) -> Callable[[Callable[..., object]], TritonCustomOp]:
    """Decorator: register ``impl`` as ``mrcnn::<name>`` (see ``TritonCustomOp``); its type hints give the schema.
    ``inline_on_cuda=False`` keeps CUDA calls opaque too (where no graph can trace into the op: an output size
    that is the data's, or a kernel inductor cannot analyse)."""

    def register(impl: Callable[..., object]) -> TritonCustomOp:
        _OPS[name] = TritonCustomOp(name, impl, inline_on_cuda)
        return _OPS[name]

    return register


# The forward ops whose torch path traces with fake tensors into static-shape aten ops (tests/kernels/
# test_decompose.py). nms/batched_nms are not among them: their output size is the data's.
TRACEABLE_OPS = ("multiscale_roi_align", "decode_boxes", "encode_boxes", "nms_fixed", "paste_masks")


def cpu_decompositions() -> dict:
    """``{torch.ops.mrcnn.<op>.default: its Python implementation}`` for ``ExportedProgram.run_decompositions``.

    ``torch.export`` keeps each of our ops as one node, which a CPU AOTInductor package could only call back
    through this project. Decomposed with its own implementation, an op is traced on fake CPU tensors, which
    take the torch path (``backend_for``): the graph then holds aten ops only. RoIAlign's adaptive sampling has
    a data-dependent sample grid and raises a ``ValueError`` when traced (a fixed ``sampling_ratio`` traces).
    """
    return {getattr(torch.ops.mrcnn, op).default: _OPS[op].impl for op in TRACEABLE_OPS}


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


@contextlib.contextmanager
def persistent_autotuning() -> Iterator[None]:
    """Inside the block, ``triton.autotune`` decorates kernels whose results persist across processes.

    Triton's ``cache_results`` (``Autotuner.check_disk_cache``): the best config of a tuning key is written to
    Triton's cache folder (``TRITON_CACHE_DIR``, default ``~/.triton/cache``) under a hash of Triton's version,
    the GPU target, the kernel's source (and what it calls), the cache-relevant environment, the key and the
    configs, so that a new process skips the benchmarking of every key tuned before. ``triton.autotune`` reads
    the ``TRITON_CACHE_AUTOTUNING`` knob when it decorates; the knob is set for the block only, so other code's
    kernels keep their own choice. Where Triton lacks it (before 3.3), the block does nothing.
    """
    knobs = getattr(triton, "knobs", None)
    if knobs is None or "cache_results" not in inspect.signature(triton.autotune).parameters:
        yield
        return
    with knobs.autotuning.scope():
        knobs.autotuning.cache = True
        yield


def autotune_configs(configs: Sequence[triton.Config]) -> list[triton.Config]:
    """The configs to autotune over: all on a GPU, the first alone under the interpreter (one
    interpreted run of every config would multiply CI time for nothing)."""
    return list(configs[:1]) if INTERPRET else list(configs)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (gradcheck), everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Bilinear samples per bin side: the cap of the adaptive grid (ceil(bin size)) of RoIAlign and the mask-loss
# targets, and the largest fixed sampling_ratio the ops accept. Only a box over 1024 bins of pixels per side
# reaches it; a finite but absurd box (1e9 pixels) would otherwise loop for hours.
MAX_SAMPLES_PER_SIDE = 1024


class OpValueError(ValueError, RuntimeError):
    """A bad op argument. A ``ValueError``, and a ``RuntimeError`` as torchvision's C++ argument checks
    (``TORCH_CHECK``) raise, so code written against either catches it."""


class OpTypeError(TypeError, RuntimeError):
    """An op argument of the wrong type (or dtype); a ``RuntimeError`` too, as ``OpValueError``."""


class BoxesFormatError(OpValueError, AssertionError):
    """RoI boxes that are neither ``Tensor[K, 5]`` nor ``list[Tensor[L, 4]]``: also an ``AssertionError``, which
    torchvision's box check (``torch._assert``) raises."""


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


def register_autocast(name: str, *, upcast: bool) -> None:
    """The autocast rule of ``torch.ops.mrcnn.<name>`` on CPU and CUDA (torchvision registers one for each of its
    ops on both): the op runs with autocast off, so the torch paths' matmuls are not lowered to half precision.

    ``upcast=True`` is torchvision's rule for ``nms``: float16/bfloat16 inputs are cast to float32 first (the
    kept boxes are those of the float32 boxes). ``upcast=False`` keeps the inputs' dtypes: our kernels read half
    types and accumulate in float32, so a cast would only copy (for RoIAlign, the whole feature pyramid) for
    the same result in the same output dtype.
    """
    op = getattr(torch.ops.mrcnn, name).default
    for device in ("cpu", "cuda"):

        def kernel(_keyset: torch._C.DispatchKeySet, *args: object, device: str = device) -> object:
            with torch.autocast(device, enabled=False):
                return op(*(_upcast(a, device) for a in args)) if upcast else op(*args)

        _AUTOCAST_LIB.impl(name, kernel, _AUTOCAST_KEYS[device], with_keyset=True)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise an ``OpTypeError``/``OpValueError`` naming ``name`` unless ``t`` is a tensor of the given rank,
    dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise OpTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise OpValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise OpTypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if device is not None and t.device != device:
        raise OpValueError(f"{name} is on {t.device} but the input is on {device}; put them on the same device")
    return t


def check_sampling_ratio(sampling_ratio: object) -> int:
    """``sampling_ratio`` as an int (Python or numpy; a float or bool is refused). A fixed ratio takes
    ``ratio**2`` samples per bin: above the adaptive grid's cap it would hang a GPU (10**6 loops 10**12 times
    per bin), so it is refused rather than silently capped."""
    try:
        if isinstance(sampling_ratio, bool):
            raise TypeError
        sampling_ratio = operator.index(sampling_ratio)
    except TypeError:
        raise OpTypeError(f"sampling_ratio must be an int, got {type(sampling_ratio).__name__}") from None
    if sampling_ratio > MAX_SAMPLES_PER_SIDE:
        raise OpValueError(
            f"sampling_ratio must be <= {MAX_SAMPLES_PER_SIDE} samples per bin side (or <= 0: adaptive), "
            f"got {sampling_ratio}"
        )
    return sampling_ratio
